//! WireGuard keys: generation, the `wg genkey` / `wg pubkey` text form, and
//! private key files (a site's and the rendezvous').
//!
//! Keys are written as standard base64 (with padding) of 32 bytes, 44
//! characters, exactly like `wg(8)`, so keys can be moved between Causeway
//! and stock WireGuard tools in either direction.

use std::fmt;
use std::fs::{self, DirBuilder};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
pub use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// Length of a key in its base64 text form.
pub const KEY_TEXT_LEN: usize = 44;

/// Which half of a key pair a text was supposed to hold; used in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A private key (`wg genkey`).
    Private,
    /// A public key (`wg pubkey`).
    Public,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::Private => "private",
            KeyKind::Public => "public",
        })
    }
}

/// Why a key could not be decoded, loaded or created.
///
/// No variant ever carries the text of a private key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The text does not have the length of a base64-encoded 32-byte key.
    #[error(
        "{kind} key is {len} characters long; expected {KEY_TEXT_LEN} characters of base64 as printed by `wg genkey`/`wg pubkey`"
    )]
    Length {
        /// Private or public.
        kind: KeyKind,
        /// Length of the text after trimming whitespace.
        len: usize,
    },
    /// The text has the right length but is not standard base64.
    #[error(
        "{kind} key is not valid base64; expected {KEY_TEXT_LEN} characters of standard base64 (A-Z a-z 0-9 + /, ending in '=') as printed by `wg genkey`/`wg pubkey`"
    )]
    Base64 {
        /// Private or public.
        kind: KeyKind,
    },
    /// The private key file exists but could not be read.
    #[error("cannot read private key file {}: {source}; check that it is a readable regular file", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The private key file exists but does not hold a valid key.
    #[error("private key file {}: {source}; replace it with the output of `causeway genkey`, or delete it to have a new key generated", path.display())]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// What is wrong with its contents.
        source: Box<KeyError>,
    },
    /// The private key file did not exist and could not be created.
    #[error("cannot create private key file {}: {source}; make its directory writable, or create the key with `causeway genkey` and install it with mode 0600", path.display())]
    Create {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Generates a new private key from the OS random source, clamped the way
/// `wg genkey` clamps it.
pub fn generate() -> StaticSecret {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes[0] &= 248;
    bytes[31] &= 127;
    bytes[31] |= 64;
    StaticSecret::from(bytes)
}

/// The `wg genkey` text form of a private key (44 characters, no newline).
pub fn encode_private(key: &StaticSecret) -> String {
    STANDARD.encode(key.as_bytes())
}

/// The `wg pubkey` text form of a public key (44 characters, no newline).
pub fn encode_public(key: &PublicKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// The same base64 text form for any 32 bytes (keys in protocol messages,
/// proofs).
pub fn encode_bytes(bytes: &[u8; 32]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes 32 bytes of public-key-like base64 (44 characters); the error
/// never echoes the input.
pub fn decode_bytes(text: &str) -> Result<[u8; 32], KeyError> {
    decode(text, KeyKind::Public)
}

/// Decodes a private key in `wg genkey` form; surrounding whitespace is ignored.
pub fn decode_private(text: &str) -> Result<StaticSecret, KeyError> {
    decode(text, KeyKind::Private).map(|bytes| StaticSecret::from(*Zeroizing::new(bytes)))
}

/// Decodes a public key in `wg pubkey` form; surrounding whitespace is ignored.
pub fn decode_public(text: &str) -> Result<PublicKey, KeyError> {
    decode(text, KeyKind::Public).map(PublicKey::from)
}

fn decode(text: &str, kind: KeyKind) -> Result<[u8; 32], KeyError> {
    let text = text.trim();
    let len = text.chars().count();
    if len != KEY_TEXT_LEN {
        return Err(KeyError::Length { kind, len });
    }
    let mut bytes = [0u8; 32];
    match STANDARD.decode_slice(text, &mut bytes) {
        Ok(32) => Ok(bytes),
        _ => Err(KeyError::Base64 { kind }),
    }
}

/// Reads a private key from `path`, or creates it there if the file
/// does not exist.
///
/// A new key file is created with mode 0600 from the start (its directory,
/// if missing, with 0700) and holds the key and a newline; it appears whole
/// or not at all, and never replaces a key file that appeared meanwhile
/// (that one is used). An existing file whose mode lets group or others in
/// is used, with a warning.
pub fn load_or_create_private_key(path: &Path) -> Result<StaticSecret, KeyError> {
    match fs::File::open(path) {
        Ok(file) => read_key_file(path, file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_key_file(path),
        Err(source) => Err(KeyError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_key_file(path: &Path, mut file: fs::File) -> Result<StaticSecret, KeyError> {
    let read_error = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let mode = file.metadata().map_err(read_error)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:o}", mode & 0o777),
            "private key file is accessible to group or others; run `chmod 600` on it"
        );
    }
    // Sized for a key and a newline up front, so that no smaller buffer
    // holding part of the key is left behind unzeroized by a reallocation.
    let mut text = Zeroizing::new(String::with_capacity(KEY_TEXT_LEN + 2));
    file.read_to_string(&mut text).map_err(read_error)?;
    decode_private(&text).map_err(|e| KeyError::Invalid {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

fn create_key_file(path: &Path) -> Result<StaticSecret, KeyError> {
    let create_error = |source| KeyError::Create {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(create_error)?;
    }
    let key = generate();
    let mut text = Zeroizing::new(String::with_capacity(KEY_TEXT_LEN + 1));
    let bytes = Zeroizing::new(key.to_bytes());
    STANDARD.encode_string(bytes.as_slice(), &mut text);
    text.push('\n');
    match crate::fs::atomic_create(path, text.as_bytes(), 0o600) {
        Ok(()) => {}
        // Another process created it between our open and create: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let file = fs::File::open(path).map_err(|source| KeyError::Read {
                path: path.to_owned(),
                source,
            })?;
            return read_key_file(path, file);
        }
        Err(e) => return Err(create_error(e)),
    }
    tracing::info!(
        path = %path.display(),
        public_key = %encode_public(&PublicKey::from(&key)),
        "created a new private key"
    );
    Ok(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use x25519_dalek::{X25519_BASEPOINT_BYTES, x25519};

    #[test]
    fn generated_keys_are_clamped_and_round_trip() {
        let key = generate();
        let bytes = key.to_bytes();
        assert_eq!(bytes[0] & 7, 0);
        assert_eq!(bytes[31] & 0xc0, 0x40);
        let text = encode_private(&key);
        assert_eq!(text.len(), KEY_TEXT_LEN);
        assert!(text.ends_with('='));
        assert_eq!(decode_private(&text).unwrap().to_bytes(), bytes);

        let public = PublicKey::from(&key);
        assert_eq!(decode_public(&encode_public(&public)).unwrap(), public);
        assert_ne!(generate().to_bytes(), bytes);
    }

    #[test]
    fn known_vectors() {
        let mut clamped = [1u8; 32];
        clamped[0] &= 248;
        clamped[31] &= 127;
        clamped[31] |= 64;
        let private = StaticSecret::from(clamped);
        let expected = x25519(clamped, X25519_BASEPOINT_BYTES);
        assert_eq!(PublicKey::from(&private).to_bytes(), expected);
        assert_eq!(
            encode_private(&private),
            "AAEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAUE="
        );
        // `wg pubkey` of the line above.
        assert_eq!(
            encode_public(&PublicKey::from(&private)),
            "pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk="
        );

        let text = "YIc7tjkQxy1Jrd8zt0fIbdsg+IvjgKWvmBhMP9hwVWE=";
        let private = decode_private(text).unwrap();
        assert_eq!(encode_private(&private), text);
        let expected = x25519(private.to_bytes(), X25519_BASEPOINT_BYTES);
        let public = PublicKey::from(&private);
        assert_eq!(public.to_bytes(), expected);
        // Cross-checked with `echo YIc7… | wg pubkey`.
        assert_eq!(
            encode_public(&public),
            "ZkgvCW+DIoRG24ZST7MmKM5j/X9m/LO8XA0qLN0Fxm0="
        );
    }

    #[test]
    fn surrounding_whitespace_is_ignored() {
        let text = "YIc7tjkQxy1Jrd8zt0fIbdsg+IvjgKWvmBhMP9hwVWE=";
        for padded in [
            format!("{text}\n"),
            format!("  {text}\r\n"),
            format!("\t{text} "),
        ] {
            assert_eq!(
                decode_private(&padded).unwrap().to_bytes(),
                decode_private(text).unwrap().to_bytes()
            );
            assert!(decode_public(&padded).is_ok());
        }
    }

    #[test]
    fn bad_keys_are_rejected_without_echoing_them() {
        let good = "YIc7tjkQxy1Jrd8zt0fIbdsg+IvjgKWvmBhMP9hwVWE=";
        let cases = [
            ("", "0 characters"),
            (
                "YIc7tjkQxy1Jrd8zt0fIbdsg+IvjgKWvmBhMP9hwVWE",
                "43 characters",
            ),
            (
                "YIc7tjkQxy1Jrd8zt0fIbdsg+IvjgKWvmBhMP9hwVWE==",
                "45 characters",
            ),
            (
                "YIc7tjkQxy1Jrd8zt0fIbdsg+IvjgKWvmBhMP9hwVW==",
                "not valid base64",
            ),
            (
                "YIc7tjkQxy1Jrd8zt0fIbdsg-IvjgKWvmBhMP9hwVWE=",
                "not valid base64",
            ),
            (
                "YIc7tjkQxy1Jrd8zt0fI dsg+IvjgKWvmBhMP9hwVWE=",
                "not valid base64",
            ),
            (
                "YIc7tjkQxy1Jrd8zt0fIbdsg+IvjgKWvmBhMP9hwVWF=",
                "not valid base64",
            ),
        ];
        for (text, expected) in cases {
            let err = decode_private(text).err().unwrap().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(err.starts_with("private key"), "{err}");
            assert!(text.is_empty() || !err.contains(&text[..10]), "{err}");
            let err = decode_public(text).err().unwrap().to_string();
            assert!(err.starts_with("public key"), "{err}");
        }
        assert!(decode_private(good).is_ok());
    }

    #[test]
    fn key_file_is_created_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/causeway/private.key");
        let created = load_or_create_private_key(&path).unwrap();

        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let dir_meta = fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(dir_meta.permissions().mode() & 0o777, 0o700);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n", encode_private(&created)));

        let loaded = load_or_create_private_key(&path).unwrap();
        assert_eq!(loaded.to_bytes(), created.to_bytes());
    }

    #[test]
    fn key_file_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the key file should be.
        let path = dir.path().join("private.key");
        fs::create_dir(&path).unwrap();
        let err = load_or_create_private_key(&path).err().unwrap();
        assert!(matches!(err, KeyError::Read { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );

        // A file holding garbage.
        let path = dir.path().join("garbage.key");
        fs::write(&path, "not a key\n").unwrap();
        let err = load_or_create_private_key(&path).err().unwrap().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("9 characters"), "{err}");
        assert!(!err.contains("not a key"), "{err}");
    }
}
