//! The little of ELF that tiexec reads: program headers from the start of a
//! file or of a mapped object. Pure over bytes.

use goblin::container::{Container, Ctx, Endian};
use goblin::elf::header::{EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2MSB};
use goblin::elf::program_header::{ProgramHeader, PF_W, PF_X, PT_INTERP, PT_LOAD};

use crate::plan::{segment_pages, Range};

/// How to read the rest of the file: its class (32 or 64 bits) and byte
/// order, from its header.
fn parse_context(header: &goblin::elf::Header) -> Ctx {
    let container = if header.e_ident[EI_CLASS] == ELFCLASS64 {
        Container::Big
    } else {
        Container::Little
    };
    let endian = if header.e_ident[EI_DATA] == ELFDATA2MSB {
        Endian::Big
    } else {
        Endian::Little
    };
    Ctx::new(container, endian)
}

/// The program headers, when `bytes` starts with an ELF header and holds
/// the headers it points to.
pub fn program_headers(bytes: &[u8]) -> Option<Vec<ProgramHeader>> {
    let header = goblin::elf::Elf::parse_header(bytes).ok()?;
    ProgramHeader::parse(
        bytes,
        usize::try_from(header.e_phoff).ok()?,
        usize::from(header.e_phnum),
        parse_context(&header),
    )
    .ok()
}

/// Reads the program headers of an ELF file: its header, then the header
/// table wherever `e_phoff` puts it (not always near the start: BOLT-laid-out
/// libraries such as librustc_driver keep it 80 MiB in).
pub fn read_program_headers(file: &std::fs::File) -> Option<Vec<ProgramHeader>> {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 64];
    file.read_exact_at(&mut head, 0).ok()?;
    let header = goblin::elf::Elf::parse_header(&head).ok()?;
    let size = usize::from(header.e_phnum).checked_mul(usize::from(header.e_phentsize))?;
    if size > 1 << 20 {
        return None;
    }
    let mut table = vec![0u8; size];
    file.read_exact_at(&mut table, header.e_phoff).ok()?;
    ProgramHeader::parse(
        &table,
        0,
        usize::from(header.e_phnum),
        parse_context(&header),
    )
    .ok()
}

/// The ELF type (`ET_EXEC`, `ET_DYN`, ...) of a file.
pub fn read_type(file: &std::fs::File) -> Option<u16> {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 64];
    file.read_exact_at(&mut head, 0).ok()?;
    Some(goblin::elf::Elf::parse_header(&head).ok()?.e_type)
}

/// The interpreter a program asks for (`PT_INTERP`).
pub fn interpreter(file: &std::fs::File, phdrs: &[ProgramHeader]) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileExt;
    let p = phdrs.iter().find(|p| p.p_type == PT_INTERP)?;
    let len = usize::try_from(p.p_filesz).ok().filter(|&l| l <= 4096)?;
    let mut raw = vec![0u8; len];
    file.read_exact_at(&mut raw, p.p_offset).ok()?;
    let raw = raw.split(|&b| b == 0).next()?;
    Some(std::ffi::OsStr::from_bytes(raw).into())
}

/// True when the program asks for an interpreter (is dynamically linked).
pub fn has_interpreter(phdrs: &[ProgramHeader]) -> bool {
    phdrs.iter().any(|p| p.p_type == PT_INTERP)
}

/// An object's `PT_LOAD` segments as mapped (page-rounded, ascending).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segments {
    /// Executable ones.
    pub text: Vec<Range>,
    /// Not writable per the ELF flags (text, headers, rodata). A RELRO part
    /// of a writable segment is not among them, although the loader makes
    /// it read-only after relocation: it is relocated data.
    pub read_only: Vec<Range>,
    /// All of them.
    pub all: Vec<Range>,
}

/// Sorts `(p_flags, p_vaddr, p_memsz)` of `PT_LOAD` headers, mapped at
/// `bias`, into [`Segments`].
pub fn segments(loads: impl Iterator<Item = (u32, u64, u64)>, bias: u64) -> Segments {
    let mut s = Segments::default();
    for (flags, vaddr, memsz) in loads {
        let range = segment_pages(bias.wrapping_add(vaddr), memsz);
        s.all.push(range);
        if flags & PF_X != 0 {
            s.text.push(range);
        }
        if flags & PF_W == 0 {
            s.read_only.push(range);
        }
    }
    s.text.sort();
    s.read_only.sort();
    s.all.sort();
    s
}

/// [`segments`] of parsed program headers.
pub fn load_segments(phdrs: &[ProgramHeader], bias: u64) -> Segments {
    segments(
        phdrs
            .iter()
            .filter(|p| p.p_type == PT_LOAD)
            .map(|p| (p.p_flags, p.p_vaddr, p.p_memsz)),
        bias,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let phdrs = program_headers(&exe).unwrap();
        assert!(has_interpreter(&phdrs));
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert_eq!(read_program_headers(&file).unwrap(), phdrs);
        let interp = interpreter(&file, &phdrs).unwrap();
        assert!(interp.to_string_lossy().contains("ld-linux"), "{interp:?}");
        let s = load_segments(&phdrs, 0);
        assert!(!s.text.is_empty() && s.all.len() >= s.text.len());
        assert!(s.text.iter().all(|t| s.read_only.contains(t)));
        assert!(s.read_only.len() < s.all.len(), "a writable segment exists");
        assert!(program_headers(b"not an elf file at all, really").is_none());
        assert!(program_headers(&exe[..40]).is_none());
    }
}
