//! Crash lines in member and agent logs (text or JSON lines): Rust panics
//! and openraft 0.9's fatal errors. A normal stop (`Fatal::Stopped`, "raft
//! stopped") is not one: members are stopped and killed on purpose.

/// Substrings that mark a crash on their own.
const MARKERS: [&str; 4] = [
    // std's panic hook: "thread 'main' panicked at src/x.rs:1:2:".
    "panicked at",
    // A task's panic seen through its JoinHandle (RaftCore's among them).
    "JoinError::Panic",
    // openraft RaftCore::main returned a fatal error other than Stopped.
    "quit RaftCore::main on error",
    // The log store saw a committed entry being truncated.
    "raft safety violated",
];

/// What a member logs when its Raft log's disk fails (the log store's
/// messages, `berth_control_plane::raft::log_store`).
const DISK_FAILURES: [&str; 3] = [
    "disk full (no space left on device)",
    "disk I/O error (EIO)",
    "an earlier raft log write failed",
];

/// Whether a fatal line is a member stopping because its disk failed: the
/// expected outcome of an injected disk fault, not a crash.
pub fn reports_disk_failure(line: &str) -> bool {
    DISK_FAILURES.iter().any(|m| line.contains(m))
}

/// Lines showing a panic or an openraft fatal error, as they appear.
pub fn fatal_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| is_fatal(l))
        .map(str::to_string)
        .collect()
}

fn is_fatal(line: &str) -> bool {
    MARKERS.iter().any(|m| line.contains(m))
        // `Fatal::Panicked` and `Fatal::StorageError(..)` in Debug form, as
        // openraft logs a dead core ("core_call fatal error",
        // "failure receiving rx from RaftCore", "RaftCore exited").
        || has_word(line, "Panicked")
        || line.contains("StorageError(")
        // `Fatal::Panicked` in Display form, as a tracing field.
        || line.contains("error=panicked")
        || line.contains("\"error\":\"panicked\"")
}

/// Whether `word` occurs in `line` not as part of a longer identifier.
fn has_word(line: &str, word: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    line.match_indices(word).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FATAL: [&str; 8] = [
        "thread 'tokio-runtime-worker' panicked at control-plane/src/state/apply.rs:212:17:",
        "thread 'main' panicked at /rustc/abc/library/core/src/option.rs:2017:5:",
        "2025-03-01T10:00:01.123456Z ERROR openraft::core::raft_core: quit RaftCore::main on error error=when Write Vote: disk I/O error",
        "2025-03-01T10:00:01.200000Z ERROR openraft::raft::raft_inner: core_call fatal error error=Panicked",
        "2025-03-01T10:00:01.200000Z ERROR openraft::raft::raft_inner: failure receiving rx from RaftCore; message: core_result=Err(StorageError(IO { source: StorageIOError { subject: Vote, verb: Write } }))",
        "2025-03-01T10:00:01.200000Z  INFO openraft::raft::raft_inner: RaftCore exited res=Err(JoinError::Panic(Id(7), \"index out of bounds\", ..))",
        "{\"timestamp\":\"2025-03-01T10:00:01.2Z\",\"level\":\"ERROR\",\"fields\":{\"message\":\"quit RaftCore::main on error\",\"error\":\"disk full\"},\"target\":\"openraft::core::raft_core\"}",
        "2025-03-01T10:00:02Z  WARN berth_control::api: client write failed error=panicked",
    ];

    const NORMAL: [&str; 7] = [
        "2025-03-01T10:00:01Z ERROR berth_control::raft::network: append entries to member 2 failed: transport error: connection refused (os error 111)",
        "2025-03-01T10:00:01Z  INFO openraft::raft::raft_inner: RaftCore exited res=Ok(Err(Stopped))",
        "2025-03-01T10:00:01Z ERROR openraft::raft::raft_inner: core_call fatal error error=Stopped",
        "2025-03-01T10:00:01Z  WARN berth_control::api: propose failed: raft stopped",
        "2025-03-01T10:00:01Z  INFO berth_agent::replica: replica r1 exited: killed by signal 9 (SIGKILL)",
        "2025-03-01T10:00:01Z  INFO berth_control: member 1 is now leader panickedness=UnPanicked",
        "",
    ];

    #[test]
    fn panics_and_fatal_raft_errors_are_flagged() {
        for l in FATAL {
            assert_eq!(fatal_lines(l), vec![l.to_string()], "not flagged: {l}");
        }
    }

    #[test]
    fn normal_errors_and_stops_are_not_flagged() {
        for l in NORMAL {
            assert!(fatal_lines(l).is_empty(), "flagged: {l}");
        }
    }

    #[test]
    fn the_offending_lines_come_back_in_order() {
        let log = [
            NORMAL[0],
            FATAL[0],
            "  0: std::panicking::begin_panic",
            NORMAL[1],
            FATAL[2],
        ]
        .join("\n");
        assert_eq!(fatal_lines(&log), vec![FATAL[0], FATAL[2]]);
    }

    #[test]
    fn only_an_injected_disk_failure_is_expected_of_a_failed_disk() {
        let eio = "2026-12-07T14:00:00Z ERROR openraft::core::raft_core: quit RaftCore::main on error error=StorageError(IO { source: \"disk I/O error (EIO) on the raft log; check the disk and restart this member\" })";
        let full = "2026-12-07T14:00:00Z ERROR openraft::core::raft_core: quit RaftCore::main on error error=disk full (no space left on device): the raft log cannot grow";
        for l in [eio, full] {
            assert_eq!(fatal_lines(l).len(), 1, "{l}");
            assert!(reports_disk_failure(l), "{l}");
        }
        for l in FATAL {
            assert!(!reports_disk_failure(l), "{l}");
        }
    }
}
