//! The tail of a hot session's context, kept compactly in memory so that reads of recent
//! messages (the common case) do not touch the store.
//!
//! Texts live back to back in one buffer and each message costs 16 bytes besides its text,
//! so a hot session holding ten 100-byte messages stays near one kilobyte.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchyard_core::window::MAX_OLDER_SYSTEM_MESSAGES;
use switchyard_core::{ContextMessage, Message, Role};

/// Most messages a cache keeps.
pub const MAX_MESSAGES: usize = 256;
/// Most bytes of names and contents a cache keeps.
pub const MAX_TEXT_BYTES: usize = 32 * 1024;
/// Most bytes of the system messages before the tail that a cache keeps; past it, a turn
/// asks the store for them.
pub const MAX_OLDER_SYSTEM_BYTES: usize = 16 * 1024;

#[derive(Clone, Copy)]
struct Entry {
    created_us: i64,
    /// Where the name starts in `text`; the content follows it.
    start: u32,
    name_len: u16,
    role: Role,
}

/// Messages `first_seq ..= last_seq()`, always the newest of the session's context.
pub struct ContextCache {
    first_seq: u64,
    entries: Vec<Entry>,
    text: String,
    /// The newest [`MAX_OLDER_SYSTEM_MESSAGES`] system messages before `first_seq`, when
    /// known: a turn's window reaches back to them past the tail.
    older_system: Option<Vec<ContextMessage>>,
}

impl ContextCache {
    /// The cache of a context whose newest message is `last_seq` and that holds nothing yet.
    pub fn empty_after(last_seq: u64) -> Self {
        ContextCache {
            first_seq: last_seq + 1,
            entries: Vec::new(),
            text: String::new(),
            // Nothing is older than the first message.
            older_system: (last_seq == 0).then(Vec::new),
        }
    }

    /// A cache built from the newest messages of a context, in seq order.
    pub fn from_tail(messages: &[ContextMessage], last_seq: u64) -> Option<Self> {
        if messages
            .last()
            .map_or(last_seq != 0, |message| message.seq != last_seq)
        {
            return None;
        }
        let mut cache = ContextCache::empty_after(messages.first().map_or(last_seq, |m| m.seq - 1));
        for message in messages {
            cache.push(
                message.role,
                &message.name,
                &message.content,
                micros(message.created_at),
            );
        }
        cache.trim();
        cache.text.shrink_to_fit();
        cache.entries.shrink_to_fit();
        Some(cache)
    }

    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.entries.len() as u64 - 1
    }

    /// The oldest seq held.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// Adds messages just committed as `first_seq …`. Returns false when they do not follow
    /// the cached tail (another append committed in between): the caller drops the cache.
    #[must_use]
    pub fn append(&mut self, first_seq: u64, messages: &[Message], at: SystemTime) -> bool {
        if first_seq != self.last_seq() + 1 {
            return false;
        }
        let created_us = micros(at);
        let added: usize = messages
            .iter()
            .map(|m| m.name.len() + m.content.len())
            .sum();
        reserve_modestly(&mut self.text, added);
        reserve_entries(&mut self.entries, messages.len());
        for message in messages {
            self.push(message.role, &message.name, &message.content, created_us);
        }
        self.trim();
        true
    }

    fn push(&mut self, role: Role, name: &str, content: &str, created_us: i64) {
        // Names are at most 64 bytes (validated); a longer one would only be cut short here.
        let name = &name[..floor_char_boundary(name, u16::MAX as usize)];
        self.entries.push(Entry {
            created_us,
            start: self.text.len() as u32,
            name_len: name.len() as u16,
            role,
        });
        self.text.push_str(name);
        self.text.push_str(content);
    }

    /// Drops the oldest messages beyond the limits.
    fn trim(&mut self) {
        let excess_messages = self.entries.len().saturating_sub(MAX_MESSAGES);
        let mut drop = excess_messages;
        while drop < self.entries.len() && self.text.len() - self.offset(drop) > MAX_TEXT_BYTES {
            drop += 1;
        }
        if drop == 0 {
            return;
        }
        if self.older_system.is_some() {
            // System messages leaving the tail are still part of every window after it.
            let leaving: Vec<ContextMessage> = (0..drop)
                .filter(|&index| self.entries[index].role == Role::System)
                .map(|index| self.message(index))
                .collect();
            if let Some(older) = &mut self.older_system {
                older.extend(leaving);
                let excess = older.len().saturating_sub(MAX_OLDER_SYSTEM_MESSAGES);
                older.drain(..excess);
            }
        }
        self.bound_older_system();
        let cut = self.offset(drop);
        self.text.drain(..cut);
        self.entries.drain(..drop);
        for entry in &mut self.entries {
            entry.start -= cut as u32;
        }
        self.first_seq += drop as u64;
    }

    fn offset(&self, index: usize) -> usize {
        self.entries
            .get(index)
            .map_or(self.text.len(), |entry| entry.start as usize)
    }

    /// The messages a read asks for, if all of them are cached: those with `seq > after_seq`,
    /// only the last `last_n` when it is positive.
    pub fn read(&self, last_n: u32, after_seq: u64) -> Option<Vec<ContextMessage>> {
        let last_seq = self.last_seq();
        let mut start = after_seq.saturating_add(1);
        if last_n > 0 {
            start = start.max((last_seq + 1).saturating_sub(u64::from(last_n)));
        }
        if start > last_seq {
            return Some(Vec::new());
        }
        if start < self.first_seq {
            return None;
        }
        let from = (start - self.first_seq) as usize;
        Some(
            (from..self.entries.len())
                .map(|index| self.message(index))
                .collect(),
        )
    }

    /// The newest [`MAX_OLDER_SYSTEM_MESSAGES`] system messages before `before_seq`, in seq
    /// order, if the cache knows them all: `before_seq` is within the tail and the system
    /// messages before the tail are known.
    pub fn system_before(&self, before_seq: u64) -> Option<Vec<ContextMessage>> {
        if before_seq < self.first_seq {
            return None;
        }
        let older = self.older_system.as_ref()?;
        let in_tail = (before_seq - self.first_seq).min(self.entries.len() as u64) as usize;
        let mut found: Vec<ContextMessage> = older
            .iter()
            .cloned()
            .chain(
                (0..in_tail)
                    .filter(|&index| self.entries[index].role == Role::System)
                    .map(|index| self.message(index)),
            )
            .collect();
        let excess = found.len().saturating_sub(MAX_OLDER_SYSTEM_MESSAGES);
        found.drain(..excess);
        Some(found)
    }

    /// Whether the system messages before the tail are known.
    pub fn knows_system_before_tail(&self) -> bool {
        self.older_system.is_some()
    }

    /// Records the system messages before the tail, as the store holds them: the newest
    /// [`MAX_OLDER_SYSTEM_MESSAGES`] with a seq below [`Self::first_seq`], in seq order.
    pub fn set_system_before_tail(&mut self, messages: Vec<ContextMessage>) {
        self.older_system = Some(messages);
        self.bound_older_system();
    }

    /// The store dropped every message before `first_kept`.
    pub fn forget_before(&mut self, first_kept: u64) {
        if let Some(older) = &mut self.older_system {
            older.retain(|message| message.seq >= first_kept);
        }
    }

    /// Forgets the system messages before the tail when they weigh too much to keep.
    fn bound_older_system(&mut self) {
        let bytes: usize = self
            .older_system
            .iter()
            .flatten()
            .map(|message| message.content.len() + message.name.len())
            .sum();
        if bytes > MAX_OLDER_SYSTEM_BYTES {
            self.older_system = None;
        }
    }

    fn message(&self, index: usize) -> ContextMessage {
        let entry = self.entries[index];
        let name_end = entry.start as usize + entry.name_len as usize;
        ContextMessage {
            seq: self.first_seq + index as u64,
            role: entry.role,
            name: self.text[entry.start as usize..name_end].to_string(),
            content: self.text[name_end..self.offset(index + 1)].to_string(),
            created_at: UNIX_EPOCH + Duration::from_micros(entry.created_us.max(0) as u64),
        }
    }
}

/// Grows by what is needed plus a quarter, not by doubling: a hot session's cache should
/// cost about what it holds.
fn reserve_modestly(text: &mut String, additional: usize) {
    let needed = text.len() + additional;
    if needed > text.capacity() {
        let target = needed.max(text.len() + text.len() / 4);
        text.reserve_exact(target - text.len());
    }
}

fn reserve_entries(entries: &mut Vec<Entry>, additional: usize) {
    let needed = entries.len() + additional;
    if needed > entries.capacity() {
        let target = needed.max(entries.len() + entries.len() / 4);
        entries.reserve_exact(target - entries.len());
    }
}

fn micros(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|since| since.as_micros() as i64)
        .unwrap_or(0)
}

fn floor_char_boundary(text: &str, max: usize) -> usize {
    if text.len() <= max {
        return text.len();
    }
    (0..=max)
        .rev()
        .find(|&index| text.is_char_boundary(index))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(content: &str) -> Message {
        Message {
            role: Role::User,
            content: content.to_string(),
            name: "n".to_string(),
        }
    }

    fn seqs(messages: &[ContextMessage]) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn reads_what_it_holds_and_misses_what_it_does_not() {
        let mut cache = ContextCache::empty_after(0);
        assert!(cache.append(
            1,
            &[message("a"), message("bb"), message("ccc")],
            SystemTime::now()
        ));
        assert_eq!(seqs(&cache.read(0, 0).unwrap()), [1, 2, 3]);
        assert_eq!(seqs(&cache.read(2, 0).unwrap()), [2, 3]);
        assert_eq!(seqs(&cache.read(0, 2).unwrap()), [3]);
        assert!(cache.read(0, 3).unwrap().is_empty());
        let read = cache.read(1, 0).unwrap();
        assert_eq!(
            (read[0].content.as_str(), read[0].name.as_str()),
            ("ccc", "n")
        );
        // Out of order: refused, the caller drops the cache.
        assert!(!cache.append(5, &[message("x")], SystemTime::now()));
    }

    #[test]
    fn keeps_only_the_newest_within_its_limits() {
        let mut cache = ContextCache::empty_after(10);
        for seq in 11..11 + MAX_MESSAGES as u64 + 5 {
            assert!(cache.append(seq, &[message(&format!("m{seq}"))], SystemTime::now()));
        }
        assert_eq!(cache.entries.len(), MAX_MESSAGES);
        assert_eq!(cache.first_seq, 16);
        assert!(cache.read(0, 0).is_none(), "seqs 11..15 were dropped");
        assert_eq!(
            cache.read(1, 0).unwrap()[0].content,
            format!("m{}", 10 + MAX_MESSAGES as u64 + 5)
        );

        let huge = "x".repeat(MAX_TEXT_BYTES + 1);
        let next = cache.last_seq() + 1;
        assert!(cache.append(next, &[message(&huge)], SystemTime::now()));
        assert!(
            cache.entries.is_empty(),
            "a message beyond the byte limit is not kept"
        );
        assert!(cache.read(1, 0).is_none());
        assert!(cache.read(0, next).unwrap().is_empty());
    }

    #[test]
    fn builds_from_a_stored_tail() {
        let now = SystemTime::now();
        let tail: Vec<ContextMessage> = (4..=6)
            .map(|seq| ContextMessage {
                seq,
                role: Role::Assistant,
                content: format!("c{seq}"),
                name: String::new(),
                created_at: now,
            })
            .collect();
        let cache = ContextCache::from_tail(&tail, 6).unwrap();
        assert_eq!(seqs(&cache.read(0, 3).unwrap()), [4, 5, 6]);
        assert!(cache.read(0, 0).is_none());
        assert!(
            ContextCache::from_tail(&tail, 7).is_none(),
            "a tail that is not the newest"
        );
        assert_eq!(ContextCache::from_tail(&[], 0).unwrap().last_seq(), 0);
    }

    fn system(content: &str) -> Message {
        Message {
            role: Role::System,
            content: content.to_string(),
            name: String::new(),
        }
    }

    #[test]
    fn system_messages_leaving_the_tail_are_kept_for_windows() {
        let mut cache = ContextCache::empty_after(0);
        let now = SystemTime::now();
        assert!(cache.append(1, &[system("be brief"), message("hi")], now));
        assert_eq!(cache.system_before(3).unwrap().len(), 1, "in the tail");
        // Enough messages to push both out of the tail.
        for seq in 3..3 + MAX_MESSAGES as u64 {
            assert!(cache.append(seq, &[message("m")], now));
        }
        assert!(cache.first_seq() > 2);
        let found = cache.system_before(cache.first_seq()).unwrap();
        assert_eq!(seqs(&found), [1]);
        assert_eq!(found[0].content, "be brief");
        assert!(
            cache.system_before(cache.first_seq() - 1).is_none(),
            "before the tail"
        );

        // The store dropped history up to seq 1: so is the old system message.
        cache.forget_before(2);
        assert!(cache.system_before(cache.first_seq()).unwrap().is_empty());
    }

    #[test]
    fn a_tail_loaded_from_the_store_learns_its_older_system_messages_once() {
        let now = SystemTime::now();
        let tail: Vec<ContextMessage> = (10..=12)
            .map(|seq| ContextMessage {
                seq,
                role: if seq == 11 { Role::System } else { Role::User },
                content: format!("c{seq}"),
                name: String::new(),
                created_at: now,
            })
            .collect();
        let mut cache = ContextCache::from_tail(&tail, 12).unwrap();
        assert!(!cache.knows_system_before_tail());
        assert!(cache.system_before(12).is_none());
        let stored = ContextMessage {
            seq: 3,
            role: Role::System,
            content: "older".into(),
            name: String::new(),
            created_at: now,
        };
        cache.set_system_before_tail(vec![stored]);
        assert_eq!(seqs(&cache.system_before(12).unwrap()), [3, 11]);
        assert_eq!(seqs(&cache.system_before(11).unwrap()), [3]);
        // Too much to keep: forgotten, and asked for again.
        cache.set_system_before_tail(vec![ContextMessage {
            seq: 4,
            role: Role::System,
            content: "x".repeat(MAX_OLDER_SYSTEM_BYTES + 1),
            name: String::new(),
            created_at: now,
        }]);
        assert!(!cache.knows_system_before_tail());
    }
}
