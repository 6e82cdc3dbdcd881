//! The little of ELF that tiexec reads: program headers, the interpreter,
//! build IDs and text relocations. The parsers take bytes (pure); the
//! `read_*` functions and `interpreter` read what they need of an open
//! file with `pread`, nothing more.

use goblin::container::{Container, Ctx, Endian};
use goblin::elf::header::{EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2MSB};
use goblin::elf::program_header::{ProgramHeader, PF_W, PF_X, PT_INTERP, PT_LOAD};

use crate::pagesize::segment_pages;
use crate::range::Range;

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

/// `NT_GNU_BUILD_ID`.
const NT_GNU_BUILD_ID: u32 = 3;

/// The GNU build ID in the bytes of a note segment (`PT_NOTE`), if any.
pub fn build_id_in_notes(notes: &[u8]) -> Option<&[u8]> {
    let word = |at: usize| -> Option<u32> {
        let b = notes.get(at..at + 4)?;
        Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let align4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let namesz = word(at)? as usize;
        let descsz = word(at + 4)? as usize;
        let kind = word(at + 8)?;
        let name_at = at + 12;
        let desc_at = name_at.checked_add(align4(namesz)?)?;
        let next = desc_at.checked_add(align4(descsz)?)?;
        if kind == NT_GNU_BUILD_ID && notes.get(name_at..name_at + namesz) == Some(b"GNU\0") {
            return notes.get(desc_at..desc_at.checked_add(descsz)?);
        }
        at = next;
    }
    None
}

/// `DT_TEXTREL`, `DT_FLAGS` and its `DF_TEXTREL` bit.
const DT_TEXTREL: u64 = 22;
const DT_FLAGS: u64 = 30;
const DF_TEXTREL: u64 = 4;

/// True when a dynamic section's `(tag, value)` entries ask for text
/// relocations: the loader writes into the object's text, which then differs
/// from its file.
pub fn has_text_relocations(entries: impl Iterator<Item = (u64, u64)>) -> bool {
    for (tag, value) in entries {
        match tag {
            0 => break, // DT_NULL
            DT_TEXTREL => return true,
            DT_FLAGS if value & DF_TEXTREL != 0 => return true,
            _ => {}
        }
    }
    false
}

/// What the loader-independent parts of an object's file say: its build ID
/// and whether it has text relocations (read with `pread`, headers and
/// small segments only).
pub fn read_identity_notes(file: &std::fs::File, phdrs: &[ProgramHeader]) -> (Vec<u8>, bool) {
    use goblin::elf::program_header::{PT_DYNAMIC, PT_NOTE};
    use std::os::unix::fs::FileExt;
    let read = |p: &ProgramHeader| -> Option<Vec<u8>> {
        let len = usize::try_from(p.p_filesz).ok().filter(|&l| l <= 1 << 20)?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, p.p_offset).ok()?;
        Some(buf)
    };
    let build_id = phdrs
        .iter()
        .filter(|p| p.p_type == PT_NOTE)
        .filter_map(read)
        .find_map(|n| build_id_in_notes(&n).map(<[u8]>::to_vec))
        .unwrap_or_default();
    let textrel = phdrs
        .iter()
        .filter(|p| p.p_type == PT_DYNAMIC)
        .filter_map(read)
        .any(|d| {
            has_text_relocations(d.chunks_exact(16).map(|e| {
                let (t, v) = e.split_at(8);
                (
                    u64::from_ne_bytes(t.try_into().unwrap_or([0; 8])),
                    u64::from_ne_bytes(v.try_into().unwrap_or([0; 8])),
                )
            }))
        });
    (build_id, textrel)
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
        let (id, textrel) = read_identity_notes(&file, &phdrs);
        assert!(!textrel);
        // Rust's linker invocation asks for a build ID on this target.
        assert!(id.is_empty() || id.len() >= 8, "{id:?}");
        assert!(program_headers(&exe[..40]).is_none());
    }

    #[test]
    fn notes_and_dynamic_entries() {
        let mut notes = Vec::new();
        // An ABI tag note first, then the build ID.
        for (kind, name, desc) in [
            (1u32, &b"GNU\0"[..], &[0u8; 16][..]),
            (3, b"GNU\0", &[0xab; 20]),
        ] {
            notes.extend_from_slice(&(name.len() as u32).to_ne_bytes());
            notes.extend_from_slice(&(desc.len() as u32).to_ne_bytes());
            notes.extend_from_slice(&kind.to_ne_bytes());
            notes.extend_from_slice(name);
            notes.extend_from_slice(desc);
        }
        assert_eq!(build_id_in_notes(&notes), Some(&[0xab; 20][..]));
        assert_eq!(build_id_in_notes(&notes[..30]), None);
        assert_eq!(build_id_in_notes(&[0xff; 64]), None);
        assert!(has_text_relocations([(1, 0), (22, 0)].into_iter()));
        assert!(has_text_relocations([(30, 4)].into_iter()));
        assert!(!has_text_relocations(
            [(30, 8), (0, 0), (22, 0)].into_iter()
        ));
    }
}
