//! The one runner for data-driven test files (`testdata/<dir>/*.txt`):
//! blocks of input lines, each followed by `----` and the expected output,
//! separated by blank lines. `#` lines are comments. The whole file is
//! compared with what the commands print; `UPDATE_EXPECT=1` rewrites it.

use std::path::PathBuf;

/// Runs every file in `testdata/<dir>`, each with a fresh `S`; `run` executes
/// one input line and returns what it prints.
pub fn check<S: Default>(dir: &str, mut run: impl FnMut(&mut S, &str) -> String) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenarios in {}", dir.display());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read scenario file");
        let mut state = S::default();
        let mut actual = String::new();
        for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
            let input = block.split("\n----").next().unwrap_or_default().trim_end();
            actual.push_str(input);
            actual.push_str("\n----\n");
            for line in input
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            {
                actual.push_str(&run(&mut state, line));
            }
            actual.push('\n');
        }
        expect_test::ExpectFile {
            path: file.clone(),
            position: file!(),
        }
        .assert_eq(&actual);
    }
}
