//! The stable-Rust fuzz driver shared by `nat-traversal/tests/fuzz.rs` and
//! `daemon/tests/fuzz.rs` (included with `#[path]`): a seeded generator,
//! structure-aware mutations of a corpus, and a time or iteration budget.
//!
//! Each target is a function of bytes that panics when a property fails
//! and returns whether the parser accepted the input (accepted inputs join
//! the in-memory corpus, so mutations reach deeper than pure noise).
//!
//! Environment (docs/fuzzing.md):
//! - `CAUSEWAY_FUZZ_SECONDS=N`: run each target for N seconds with a random
//!   seed instead of its fixed iteration budget (the long-run mode);
//! - `CAUSEWAY_FUZZ_SEED=S`: use seed S (to replay a failure).
//!
//! A failing input is written under the test target directory and its
//! seed, iteration and hex are printed before the panic continues.

#![allow(dead_code)]

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// splitmix64: small, seeded, good enough to pick mutations.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub(crate) fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub(crate) fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Values that break length and offset fields.
const EXTREMES: [u64; 10] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    u64::MAX,
];

/// Applies one to four random mutations to `input`.
pub(crate) fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>], dict: &[&[u8]]) {
    for _ in 0..=rng.below(4) {
        match rng.below(10) {
            // Flip a bit.
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            // Truncate.
            1 if !input.is_empty() => {
                let at = rng.below(input.len());
                input.truncate(at);
            }
            // Append random bytes.
            2 => {
                let n = 1 + rng.below(16);
                input.extend(rng.bytes(n));
            }
            // A 1-, 2-, 4- or 8-byte big- or little-endian field set to an extreme.
            3 | 4 if !input.is_empty() => {
                let width = [1, 2, 4, 8][rng.below(4)];
                let at = rng.below(input.len());
                let value = *rng.pick(&EXTREMES);
                let bytes = if rng.chance(2) {
                    value.to_be_bytes()
                } else {
                    value.to_le_bytes()
                };
                let src = if rng.chance(2) {
                    &bytes[8 - width..]
                } else {
                    &bytes[..width]
                };
                for (i, b) in src.iter().enumerate() {
                    if let Some(slot) = input.get_mut(at + i) {
                        *slot = *b;
                    }
                }
            }
            // Insert or delete a run of bytes.
            5 if !input.is_empty() => {
                let at = rng.below(input.len());
                let n = 1 + rng.below(8.min(input.len() - at));
                input.drain(at..at + n);
            }
            6 => {
                let at = rng.below(input.len() + 1);
                let n = 1 + rng.below(8);
                let b = rng.byte();
                input.splice(at..at, std::iter::repeat_n(b, n));
            }
            // Splice in part of another corpus entry.
            7 if !corpus.is_empty() => {
                let other = rng.pick(corpus);
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let to = from + rng.below(other.len() - from) + 1;
                    let at = rng.below(input.len() + 1);
                    input.splice(at..at, other[from..to].iter().copied());
                }
            }
            // Insert a dictionary token.
            8 if !dict.is_empty() => {
                let at = rng.below(input.len() + 1);
                let token = rng.pick(dict);
                input.splice(at..at, token.iter().copied());
            }
            // Overwrite a random byte.
            _ if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.byte();
            }
            _ => input.push(rng.byte()),
        }
    }
}

/// A fuzz target for the driver.
pub(crate) struct Target<'a> {
    /// Name: the corpus is `fuzz/corpus/<name>/`.
    pub(crate) name: &'a str,
    /// Iterations in the normal test run (kept small: the whole pass must
    /// stay within seconds in debug).
    pub(crate) iterations: u64,
    /// Tokens that mutations insert (keywords, separators).
    pub(crate) dict: &'a [&'a [u8]],
}

fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name)
}

/// Reads the seed corpus of a target (every file in its directory).
pub(crate) fn load_corpus(name: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(name))
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a run did.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) seed: u64,
    pub(crate) iterations: u64,
    pub(crate) accepted: u64,
    pub(crate) elapsed: Duration,
}

/// Runs `check` on the corpus, then on mutated and generated inputs, within
/// the budget. `generate` makes a valid (structure-aware) input.
pub(crate) fn run(
    target: &Target<'_>,
    mut generate: impl FnMut(&mut Rng) -> Vec<u8>,
    mut check: impl FnMut(&[u8]) -> bool,
) -> Report {
    let long_run = std::env::var("CAUSEWAY_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let seed = std::env::var("CAUSEWAY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            if long_run.is_some() {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            } else {
                // Fixed per target: the normal run is reproducible.
                target.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                })
            }
        });
    eprintln!(
        "fuzz {}: seed {seed}{}",
        target.name,
        long_run.map_or(String::new(), |d| format!(", for {} s", d.as_secs()))
    );
    let mut rng = Rng::new(seed);
    let mut corpus = load_corpus(target.name);
    assert!(
        !corpus.is_empty(),
        "no seed corpus in {}",
        corpus_dir(target.name).display()
    );
    let start = Instant::now();
    let mut iterations = 0u64;
    let mut accepted = 0u64;
    let mut attempt = |input: &[u8], iteration: u64, corpus: &mut Vec<Vec<u8>>| match catch_unwind(
        AssertUnwindSafe(|| check(input)),
    ) {
        Ok(true) => {
            accepted += 1;
            if corpus.len() < 2000 {
                corpus.push(input.to_vec());
            }
        }
        Ok(false) => {}
        Err(panic) => {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
            let file = dir.join(format!("{}-{seed}-{iteration}", target.name));
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(&file, input);
            eprintln!(
                "fuzz {}: FAILED at iteration {iteration} (seed {seed}); input ({} bytes, saved to {}): {}",
                target.name,
                input.len(),
                file.display(),
                hex(input)
            );
            resume_unwind(panic);
        }
    };
    // The corpus as it is, first.
    for input in corpus.clone() {
        attempt(&input, iterations, &mut corpus);
        iterations += 1;
    }
    let dict = target.dict;
    loop {
        match long_run {
            Some(d) if start.elapsed() >= d => break,
            None if iterations >= target.iterations => break,
            _ => {}
        }
        let input = match rng.below(8) {
            0 => {
                let n = rng.below(96);
                rng.bytes(n)
            }
            1 => generate(&mut rng),
            2 => {
                let mut input = generate(&mut rng);
                mutate(&mut rng, &mut input, &corpus, dict);
                input
            }
            _ => {
                let mut input = rng.pick(&corpus).clone();
                mutate(&mut rng, &mut input, &corpus, dict);
                input
            }
        };
        attempt(&input, iterations, &mut corpus);
        iterations += 1;
    }
    let report = Report {
        seed,
        iterations,
        accepted,
        elapsed: start.elapsed(),
    };
    eprintln!(
        "fuzz {}: {} inputs ({} accepted) in {:.1} s, no failure",
        target.name,
        report.iterations,
        report.accepted,
        report.elapsed.as_secs_f64()
    );
    report
}
