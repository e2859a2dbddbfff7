//! Embedding must stay small: at most 10 lines marked `// longjob: mount` (building the
//! `LongJob` and mounting its router, in `main.rs` and `lib.rs`) and at most 15 lines of code
//! between `// longjob: handler begin` and `// longjob: handler end` (the job kind).
//! Imports marked `// longjob: import` are listed apart.

const LIB: &str = include_str!("../src/lib.rs");
const MAIN: &str = include_str!("../src/main.rs");

fn marked(marker: &str) -> usize {
    let lines = [LIB, MAIN].into_iter().flat_map(str::lines);
    // Doc comments that name a marker do not count.
    lines.filter(|l| l.contains(marker) && !l.trim_start().starts_with("//!")).count()
}

#[test]
fn building_and_mounting_takes_at_most_10_lines() {
    let mount = marked("// longjob: mount");
    println!("mount lines: {mount}, import lines: {}", marked("// longjob: import"));
    assert!(mount > 0 && mount <= 10, "{mount} mount lines");
}

#[test]
fn the_job_kind_takes_at_most_15_lines() {
    let begin = LIB.find("\n// longjob: handler begin\n").expect("a handler begin marker");
    let end = LIB.find("\n// longjob: handler end\n").expect("a handler end marker");
    let code = LIB[begin..end]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .count();
    println!("handler lines: {code}");
    assert!(code > 0 && code <= 15, "{code} handler lines");
}
