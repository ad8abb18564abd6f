//! The event log of one member: the events of every command it applied
//! (`state::events`, the same on every member) and, on the leader, what it
//! observes in heartbeats (replica phase changes). In memory: the last
//! `CAPACITY` events; `berth events -f` gets new ones through a broadcast
//! channel. A restarted member rebuilds recent history as it re-applies its
//! log.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

pub use crate::state::events::Event;

/// Events kept per member.
pub const CAPACITY: usize = 2000;

/// A member's event log. Cloning shares it.
#[derive(Clone)]
pub struct EventLog {
    recent: Arc<Mutex<VecDeque<Event>>>,
    tx: broadcast::Sender<Event>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            recent: Arc::default(),
            tx: broadcast::Sender::new(256),
        }
    }
}

impl EventLog {
    /// Records events.
    pub fn extend(&self, events: impl IntoIterator<Item = Event>) {
        let Ok(mut recent) = self.recent.lock() else {
            return;
        };
        for e in events {
            if recent.len() == CAPACITY {
                recent.pop_front();
            }
            recent.push_back(e.clone());
            // No follower listening is fine.
            let _ = self.tx.send(e);
        }
    }

    /// The last `n` events, oldest first.
    pub fn recent(&self, n: usize) -> Vec<Event> {
        self.recent
            .lock()
            .map(|r| r.iter().skip(r.len().saturating_sub(n)).cloned().collect())
            .unwrap_or_default()
    }

    /// New events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(n: u64) -> Event {
        Event {
            at_ms: n,
            severity: "info",
            kind: "node",
            object: "n".into(),
            message: format!("event {n}"),
        }
    }

    #[test]
    fn keeps_the_last_events_and_broadcasts_new_ones() {
        let log = EventLog::default();
        log.extend((0..(CAPACITY as u64 + 5)).map(e));
        let recent = log.recent(3);
        assert_eq!(
            recent.iter().map(|x| x.at_ms).collect::<Vec<_>>(),
            [
                CAPACITY as u64 + 2,
                CAPACITY as u64 + 3,
                CAPACITY as u64 + 4
            ]
        );
        assert_eq!(log.recent(usize::MAX).len(), CAPACITY);
        let mut rx = log.subscribe();
        log.extend([e(1)]);
        assert_eq!(rx.try_recv().map(|x| x.at_ms).ok(), Some(1));
    }
}
