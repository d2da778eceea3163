//! X25519 keys in the `wg genkey` / `wg pubkey` text form, and the
//! rendezvous' private key file.
//!
//! The same format as the daemon's keys (standard base64 of 32 bytes, 44
//! characters), so `causeway genkey` / `causeway pubkey` work for the
//! rendezvous key too.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use x25519_dalek::{PublicKey, StaticSecret};

/// Length of a key in its base64 text form.
const KEY_TEXT_LEN: usize = 44;

/// Why the rendezvous' private key file could not be loaded or created.
///
/// No variant carries the text of a private key.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The key file exists but could not be read.
    #[error("cannot read private key file {}: {source}; check that it is a readable regular file", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The key file exists but does not hold a key.
    #[error("private key file {}: {why}; replace it with the output of `causeway genkey`, or delete it to have a new key generated", path.display())]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// What is wrong with its contents.
        why: String,
    },
    /// The key file did not exist and could not be created.
    #[error("cannot create private key file {}: {source}; make its directory writable, or create the key with `causeway genkey` and install it with mode 0600", path.display())]
    Create {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// The `wg pubkey` text form of a public key.
pub(crate) fn encode_public(key: &PublicKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// The base64 text form of any 32 bytes (public keys in messages, proofs).
pub(crate) fn encode_bytes(bytes: &[u8; 32]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes 32 bytes of standard base64 (44 characters); surrounding
/// whitespace is ignored. The error never echoes the input.
pub(crate) fn decode_bytes(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    let len = text.chars().count();
    if len != KEY_TEXT_LEN {
        return Err(format!(
            "key is {len} characters long; expected {KEY_TEXT_LEN} characters of base64 as printed by `wg pubkey`/`causeway pubkey`"
        ));
    }
    let mut bytes = [0u8; 32];
    match STANDARD.decode_slice(text, &mut bytes) {
        Ok(32) => Ok(bytes),
        _ => Err(format!(
            "key is not valid base64; expected {KEY_TEXT_LEN} characters of standard base64 (A-Z a-z 0-9 + /, ending in '=')"
        )),
    }
}

/// Decodes a public key in `wg pubkey` form.
pub(crate) fn decode_public(text: &str) -> Result<PublicKey, String> {
    decode_bytes(text).map(PublicKey::from)
}

fn generate() -> StaticSecret {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes[0] &= 248;
    bytes[31] &= 127;
    bytes[31] |= 64;
    StaticSecret::from(bytes)
}

/// Reads the private key from `path`, or creates it there (mode 0600, its
/// directory 0700 if missing) when the file does not exist.
pub(crate) fn load_or_create_private_key(path: &Path) -> Result<StaticSecret, KeyFileError> {
    match fs::File::open(path) {
        Ok(file) => read_key_file(path, file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_key_file(path),
        Err(source) => Err(KeyFileError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_key_file(path: &Path, mut file: fs::File) -> Result<StaticSecret, KeyFileError> {
    let read_error = |source| KeyFileError::Read {
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
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read_error)?;
    decode_bytes(&text)
        .map(StaticSecret::from)
        .map_err(|why| KeyFileError::Invalid {
            path: path.to_owned(),
            why: why.replacen("key is", "private key is", 1),
        })
}

fn create_key_file(path: &Path) -> Result<StaticSecret, KeyFileError> {
    let create_error = |source| KeyFileError::Create {
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
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let file = fs::File::open(path).map_err(|source| KeyFileError::Read {
                path: path.to_owned(),
                source,
            })?;
            return read_key_file(path, file);
        }
        Err(e) => return Err(create_error(e)),
    };
    let key = generate();
    let written = file
        .write_all(format!("{}\n", STANDARD.encode(key.as_bytes())).as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(path);
        return Err(create_error(e));
    }
    tracing::info!(
        path = %path.display(),
        public_key = %encode_public(&PublicKey::from(&key)),
        "created a new rendezvous private key"
    );
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_created_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/rendezvous.key");
        let created = load_or_create_private_key(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), KEY_TEXT_LEN);
        let loaded = load_or_create_private_key(&path).unwrap();
        assert_eq!(loaded.to_bytes(), created.to_bytes());

        let bad = dir.path().join("bad.key");
        fs::write(&bad, "secret-ish garbage\n").unwrap();
        let err = load_or_create_private_key(&bad).err().unwrap().to_string();
        assert!(err.contains(&bad.display().to_string()), "{err}");
        assert!(!err.contains("garbage"), "{err}");
    }

    #[test]
    fn wg_vectors_decode() {
        // `wg pubkey` of AAEBAQEB…AUE= (see the daemon's key tests).
        let public = decode_public("pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk=").unwrap();
        let private = StaticSecret::from(
            decode_bytes("AAEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAUE=").unwrap(),
        );
        assert_eq!(PublicKey::from(&private), public);
        assert!(decode_public("short").is_err());
        assert!(decode_public("YIc7tjkQxy1Jrd8zt0fIbdsg-IvjgKWvmBhMP9hwVWE=").is_err());
    }
}
