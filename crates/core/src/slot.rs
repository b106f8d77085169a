//! The user → slot function. It is part of the public contract: any client, in any
//! language, computes the same slot as `slot = u64_be(sha256(user_id)[0..8]) % slot_count`.

use ring::digest;

/// Slots per cluster unless configured otherwise.
pub const DEFAULT_SLOT_COUNT: u32 = 1024;

/// A slot number in `0..slot_count`.
pub type Slot = u32;

/// The slot a user's sessions, quotas and limits live in.
pub fn slot_of(user_id: &str, slot_count: u32) -> Slot {
    assert!(slot_count > 0, "slot_count must be positive");
    let hash = digest::digest(&digest::SHA256, user_id.as_bytes());
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&hash.as_ref()[..8]);
    (u64::from_be_bytes(prefix) % u64::from(slot_count)) as Slot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_specified_function() {
        // sha256("alice") = 2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90
        let prefix = 0x2bd8_06c9_7f0e_00af_u64;
        assert_eq!(slot_of("alice", 1024), (prefix % 1024) as u32);
        assert_eq!(slot_of("alice", 7), (prefix % 7) as u32);
    }

    #[test]
    fn spreads_users_over_slots() {
        let mut counts = vec![0u32; 16];
        for user in 0..16_000 {
            counts[slot_of(&format!("user-{user}"), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&count| (800..1200).contains(&count)),
            "{counts:?}"
        );
    }
}
