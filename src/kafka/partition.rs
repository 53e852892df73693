//! Partition choice. kafboy picks the partition itself for every strategy but `auto` on a keyless
//! record (left to librdkafka's sticky partitioner), using the partition count from its metadata
//! cache. Keys hash exactly as Kafka's Java client does, so kafboy and Java producers agree.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::config::Partitioner;

/// How long the `sticky` strategy stays on one partition (what librdkafka's sticky partitioner
/// keeps one for behind the default 5 ms linger of `/async`, twice that).
const STICKY_WINDOW_MS: u64 = 10;

/// Per-topic state of the stateful strategies.
#[derive(Debug)]
pub struct Rotation {
    next: AtomicU32,
    /// Sticky partition in the low 32 bits, the window it was chosen in above them.
    sticky: AtomicU64,
    epoch: Instant,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            next: AtomicU32::new(rand::random()),
            sticky: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
        }
    }
}

/// Why no partition could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRequired;

/// The partition for one record, or `None` to let librdkafka choose (keyless `auto`).
pub fn choose(
    strategy: Partitioner,
    key: Option<&[u8]>,
    partitions: i32,
    rotation: &Rotation,
) -> Result<Option<i32>, KeyRequired> {
    let n = partitions.max(1) as u32;
    let p = match (strategy, key) {
        (Partitioner::Auto | Partitioner::KeyHash, Some(key)) => key_hash(key, n),
        (Partitioner::Auto, None) => return Ok(None),
        (Partitioner::KeyHash, None) => return Err(KeyRequired),
        (Partitioner::Random, _) => rand::random_range(0..n),
        (Partitioner::RoundRobin, _) => rotation.next.fetch_add(1, Ordering::Relaxed) % n,
        (Partitioner::Sticky, _) => {
            let window = rotation.epoch.elapsed().as_millis() as u64 / STICKY_WINDOW_MS;
            sticky(rotation, n, window)
        }
    };
    // p < n ≤ i32::MAX, so the cast is lossless.
    Ok(Some(p as i32))
}

/// The partition of window number `window` (since the rotation's epoch).
fn sticky(rotation: &Rotation, n: u32, window: u64) -> u32 {
    // The window number's low 32 bits: the high half of the word holds no more, and a number
    // that outgrew it (after about 500 days) would never match again.
    let window = window & 0xffff_ffff;
    let current = rotation.sticky.load(Ordering::Relaxed);
    if current >> 32 == window && (current as u32) < n {
        return current as u32;
    }
    let chosen = rand::random_range(0..n);
    // Whoever wins the race for a new window decides its partition for everyone.
    match rotation.sticky.compare_exchange(
        current,
        (window << 32) | u64::from(chosen),
        Ordering::Relaxed,
        Ordering::Relaxed,
    ) {
        Ok(_) => chosen,
        Err(now) if now >> 32 == window && (now as u32) < n => now as u32,
        Err(_) => chosen,
    }
}

/// Kafka's default partitioner for keyed records: `toPositive(murmur2(key)) % n`.
pub fn key_hash(key: &[u8], n: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % n
}

/// Murmur2 as in Kafka's `org.apache.kafka.common.utils.Utils.murmur2` (seed 0x9747b28c).
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_java_test_vectors() {
        for (input, want) in [
            (&b"21"[..], -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ] {
            assert_eq!(
                murmur2(input) as i32,
                want,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    fn spread(strategy: Partitioner, key: Option<&[u8]>, n: i32, draws: usize) -> Vec<usize> {
        let rotation = Rotation::default();
        let mut counts = vec![0; n as usize];
        for _ in 0..draws {
            let p = choose(strategy, key, n, &rotation).unwrap().unwrap();
            counts[p as usize] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_is_exactly_even() {
        assert!(
            spread(Partitioner::RoundRobin, None, 7, 700)
                .iter()
                .all(|&c| c == 100)
        );
        assert!(
            spread(Partitioner::RoundRobin, Some(b"k"), 256, 2560)
                .iter()
                .all(|&c| c == 10)
        );
    }

    #[test]
    fn random_is_uniform_and_not_sticky() {
        let counts = spread(Partitioner::Random, None, 8, 80_000);
        // Each bucket expects 10000 (sd ≈ 94); 10 sd of slack keeps this from ever flaking.
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
        let rotation = Rotation::default();
        let firsts: std::collections::HashSet<_> = (0..64)
            .map(|_| choose(Partitioner::Random, None, 8, &rotation).unwrap())
            .collect();
        assert!(firsts.len() > 1, "consecutive draws must not stick");
    }

    #[test]
    fn key_hash_is_stable_and_spreads_keys() {
        let rotation = Rotation::default();
        let p = |k: &str| choose(Partitioner::KeyHash, Some(k.as_bytes()), 3, &rotation).unwrap();
        // Where librdkafka's murmur2 partitioner put these keys on a 3-partition topic.
        assert_eq!(
            [p("k0"), p("k1"), p("k2"), p("k9")],
            [Some(2), Some(2), Some(0), Some(2)]
        );
        let mut counts = [0usize; 16];
        for i in 0..16_000 {
            counts[key_hash(format!("user-{i}").as_bytes(), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(
            choose(Partitioner::KeyHash, None, 3, &rotation),
            Err(KeyRequired)
        );
    }

    #[test]
    fn auto_hashes_keys_and_leaves_keyless_to_librdkafka() {
        let rotation = Rotation::default();
        assert_eq!(choose(Partitioner::Auto, None, 8, &rotation), Ok(None));
        let want = key_hash(b"abc", 8) as i32;
        assert_eq!(
            choose(Partitioner::Auto, Some(b"abc"), 8, &rotation),
            Ok(Some(want))
        );
    }

    #[test]
    fn sticky_still_sticks_after_500_days() {
        let rotation = Rotation::default();
        let window = 500 * 86_400 * 1000 / STICKY_WINDOW_MS;
        let first = sticky(&rotation, 64, window);
        for _ in 0..50 {
            assert_eq!(sticky(&rotation, 64, window), first);
        }
    }

    #[test]
    fn sticky_holds_one_partition_within_a_window() {
        let rotation = Rotation::default();
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let mut seen = std::collections::HashSet::new();
        // Draws within one window agree; over many windows several partitions are used.
        while seen.len() <= 2 {
            assert!(Instant::now() < deadline, "{seen:?}");
            let window = rotation.epoch.elapsed().as_millis() as u64 / STICKY_WINDOW_MS;
            let a = choose(Partitioner::Sticky, Some(b"x"), 64, &rotation).unwrap();
            let b = choose(Partitioner::Sticky, None, 64, &rotation).unwrap();
            let same_window =
                rotation.epoch.elapsed().as_millis() as u64 / STICKY_WINDOW_MS == window;
            if same_window {
                assert_eq!(a, b);
            }
            seen.insert(a);
        }
    }
}
