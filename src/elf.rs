//! The little of ELF that tiexec reads: program headers from the start of a
//! file or of a mapped object. Pure over bytes.

use goblin::container::{Container, Ctx, Endian};
use goblin::elf::header::{EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2MSB};
use goblin::elf::program_header::{ProgramHeader, PF_X, PT_INTERP, PT_LOAD};

use crate::plan::{segment_pages, Range};

/// The program headers, when `bytes` starts with an ELF header and holds
/// the headers it points to.
pub fn program_headers(bytes: &[u8]) -> Option<Vec<ProgramHeader>> {
    let header = goblin::elf::Elf::parse_header(bytes).ok()?;
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
    ProgramHeader::parse(
        bytes,
        usize::try_from(header.e_phoff).ok()?,
        usize::from(header.e_phnum),
        Ctx::new(container, endian),
    )
    .ok()
}

/// True when the program asks for an interpreter (is dynamically linked).
pub fn has_interpreter(phdrs: &[ProgramHeader]) -> bool {
    phdrs.iter().any(|p| p.p_type == PT_INTERP)
}

/// The (executable, all) `PT_LOAD` segments as mapped at `bias`
/// (page-rounded, ascending).
pub fn load_segments(phdrs: &[ProgramHeader], bias: u64) -> (Vec<Range>, Vec<Range>) {
    let mut text = Vec::new();
    let mut all = Vec::new();
    for ph in phdrs.iter().filter(|p| p.p_type == PT_LOAD) {
        let range = segment_pages(bias.wrapping_add(ph.p_vaddr), ph.p_memsz);
        all.push(range);
        if ph.p_flags & PF_X != 0 {
            text.push(range);
        }
    }
    text.sort();
    all.sort();
    (text, all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let phdrs = program_headers(&exe).unwrap();
        assert!(has_interpreter(&phdrs));
        let (text, all) = load_segments(&phdrs, 0);
        assert!(!text.is_empty() && all.len() >= text.len());
        assert!(program_headers(b"not an elf file at all, really").is_none());
        assert!(program_headers(&exe[..40]).is_none());
    }
}
