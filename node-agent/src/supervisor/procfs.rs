//! Process identity through /proc: a pid plus its start time (clock ticks
//! since boot) names one process for its whole life, so a recycled pid is
//! never mistaken for a replica after an agent restart.

use serde::{Deserialize, Serialize};

/// A process, named so that pid reuse cannot fool us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    /// The process id.
    pub pid: u32,
    /// Field 22 of /proc/PID/stat: start time in clock ticks since boot.
    pub start_ticks: u64,
}

impl ProcId {
    /// The identity of a running process, if it runs.
    pub fn of(pid: u32) -> Option<Self> {
        start_ticks(pid).map(|start_ticks| ProcId { pid, start_ticks })
    }

    /// Whether this very process still exists (a zombie counts as gone).
    pub fn alive(&self) -> bool {
        match stat(self.pid) {
            Some((state, start)) => start == self.start_ticks && state != 'Z' && state != 'X',
            None => false,
        }
    }
}

/// The start time of a process, if it exists.
pub fn start_ticks(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, start)| start)
}

/// (state, start time) from /proc/PID/stat. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted after the last ')'.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3), start time is field 22: 19 more fields on.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_changed_start_is_not() {
        let me = ProcId::of(std::process::id()).expect("own stat");
        assert!(me.alive());
        let impostor = ProcId {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert!(!impostor.alive());
        assert!(ProcId::of(u32::MAX).is_none());
    }
}
