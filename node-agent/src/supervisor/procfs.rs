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
            Some(s) => s.start == self.start_ticks && s.state != 'Z' && s.state != 'X',
            None => false,
        }
    }

    /// Sends `signal` to this process if it is still this process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if self.alive() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal);
        }
    }
}

/// The start time of a process, if it exists.
pub fn start_ticks(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.start)
}

/// Whether process `pid` is `server` or in the process group it leads
/// (started no earlier than it, so a recycled group id does not count).
pub fn in_group(pid: u32, server: &ProcId) -> bool {
    if pid == server.pid {
        return true;
    }
    stat(pid).is_some_and(|s| s.pgrp == server.pid && s.start >= server.start_ticks)
}

struct Stat {
    state: char,
    pgrp: u32,
    start: u64,
}

/// Fields of /proc/PID/stat. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after the last ')'.
fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state); pgrp is field 5, start time field 22.
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Kills a replica's process group: the server it was started as and every
/// process still in its group (workers outlive a crashed leader). Only
/// processes started no earlier than the server are touched, so a recycled
/// group id never hits an unrelated process. Returns how many were signalled.
pub fn kill_group(server: ProcId) -> usize {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Some(s) = stat(pid) else { continue };
        if s.pgrp == server.pid
            && s.start >= server.start_ticks
            && s.state != 'Z'
            && kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok()
        {
            killed += 1;
        }
    }
    killed
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

    #[test]
    fn a_group_holds_its_leader_and_members_only() {
        use std::os::unix::process::CommandExt;
        let mut leader = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let id = ProcId::of(leader.id()).unwrap();
        assert!(in_group(leader.id(), &id));
        // This test's process is not in the new group.
        assert!(!in_group(std::process::id(), &id));
        let mut member = std::process::Command::new("sleep")
            .arg("60")
            .process_group(leader.id() as i32)
            .spawn()
            .unwrap();
        assert!(in_group(member.id(), &id));
        // A group "led" by a process that started later is not this one.
        let later = ProcId {
            start_ticks: id.start_ticks + 1_000_000,
            ..id
        };
        assert!(!in_group(member.id(), &later));
        let _ = member.kill();
        let _ = leader.kill();
        let _ = member.wait();
        let _ = leader.wait();
    }

    #[test]
    fn kill_group_kills_the_leader_and_the_members_left_behind() {
        use std::os::unix::process::CommandExt;
        // A group whose leader exits at once and leaves a worker behind.
        let leader = std::process::Command::new("sh")
            .args(["-c", "sleep 60 >/dev/null 2>&1 & echo $!"])
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let id = ProcId::of(leader.id()).unwrap();
        let out = leader.wait_with_output().unwrap();
        let worker: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let worker_id = ProcId::of(worker).unwrap();
        assert!(worker_id.alive());
        assert!(!id.alive(), "the leader has exited");
        assert_eq!(kill_group(id), 1);
        for _ in 0..100 {
            if !worker_id.alive() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!worker_id.alive(), "the worker left behind was killed");
    }
}
