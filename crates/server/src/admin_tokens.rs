//! The admin tokens a server accepts, kept as SHA-256 digests only.
//!
//! ```text
//!   DATA/admin-tokens (0600)        DATA/admin.token (0600)
//!   # comment                       <the first token>: the admins' copy,
//!   sha256:<64 hex> NAME            written once on first start for the
//!   sha256:<64 hex> NAME            local CLI; the server never reads it
//!                                   again once admin-tokens exists
//! ```
//!
//! A token is 256 random bits shown once, to whoever made it: a copy of
//! the data folder, a backup, or a reader of `admin-tokens` learns digests
//! it cannot call the API with. `vstream token add|list|remove --data DIR`
//! edits the file (root, offline); a running server sees the change at
//! the next admin request (it checks the file's size, time and inode),
//! so a removed token stops working at once, without a restart.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// The digests, in the data folder.
pub const STORE_FILE: &str = "admin-tokens";
/// The first token, for the local CLI, in the data folder.
pub const FIRST_TOKEN_FILE: &str = "admin.token";
/// The name of the first token.
pub const FIRST_NAME: &str = "admin";

/// Why the token store cannot be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}, line {line}: {why}", path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{0:?} is not a token name: 1 to 64 of letters, digits, '.', '_' and '-'")]
    BadName(String),
    #[error("there is already a token named {0:?}")]
    Exists(String),
    #[error("there is no token named {0:?}")]
    NoSuch(String),
}

/// One accepted token: its name and the SHA-256 of it, in hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub digest: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TokenError + '_ {
    move |source| TokenError::Io {
        path: path.to_owned(),
        source,
    }
}

fn check_name(name: &str) -> Result<(), TokenError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(TokenError::BadName(name.to_owned()))
    }
}

fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, TokenError> {
    let mut entries: Vec<Entry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| TokenError::Malformed {
            path: path.to_owned(),
            line: i + 1,
            why: why.to_owned(),
        };
        let (digest, name) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| bad("want `sha256:<64 hex digits> NAME`"))?;
        let name = name.trim();
        let digest = digest
            .strip_prefix("sha256:")
            .filter(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| bad("the digest is not `sha256:` and 64 hex digits"))?;
        check_name(name).map_err(|e| bad(&e.to_string()))?;
        if entries.iter().any(|e| e.name == name) {
            return Err(bad(&format!("a second token named {name:?}")));
        }
        entries.push(Entry {
            name: name.to_owned(),
            digest: digest.to_ascii_lowercase(),
        });
    }
    Ok(entries)
}

/// The tokens of the data folder `data`.
pub fn read(data: &Path) -> Result<Vec<Entry>, TokenError> {
    let path = data.join(STORE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    parse(&path, &text)
}

/// Replaces the store with `entries`: a new file (0600), synced, renamed
/// over the old one, so a reader sees the old set or the new one.
fn write(data: &Path, entries: &[Entry]) -> Result<(), TokenError> {
    let path = data.join(STORE_FILE);
    let tmp = data.join(format!(".{STORE_FILE}.new"));
    let mut text = String::from(
        "# The admin tokens this server accepts: their SHA-256 only.\n\
         # Edit with `vstream token add|list|remove --data DIR`.\n",
    );
    for e in entries {
        text.push_str(&format!("sha256:{} {}\n", e.digest, e.name));
    }
    write_private(&tmp, &text)?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    std::fs::File::open(data)
        .and_then(|d| d.sync_all())
        .map_err(io(data))
}

/// Writes `text` to a new file `path` only its owner can read.
pub fn write_private(path: &Path, text: &str) -> Result<(), TokenError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    // An older file keeps its mode through `create`: make sure.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|_| f.write_all(text.as_bytes()))
        .and_then(|_| f.sync_all())
        .map_err(io(path))
}

/// Adds a token named `name`; returns the token, which exists nowhere else.
pub fn add(data: &Path, name: &str) -> Result<String, TokenError> {
    check_name(name)?;
    let mut entries = read(data)?;
    if entries.iter().any(|e| e.name == name) {
        return Err(TokenError::Exists(name.to_owned()));
    }
    let token = vstream_pki::new_token();
    entries.push(Entry {
        name: name.to_owned(),
        digest: vstream_pki::token_digest(&token),
    });
    write(data, &entries)?;
    Ok(token)
}

/// Removes the token named `name`; a running server refuses it from its
/// next admin request on.
pub fn remove(data: &Path, name: &str) -> Result<(), TokenError> {
    let mut entries = read(data)?;
    let before = entries.len();
    entries.retain(|e| e.name != name);
    if entries.len() == before {
        return Err(TokenError::NoSuch(name.to_owned()));
    }
    write(data, &entries)
}

/// What a server starts with: the store, made on first start. A data
/// folder of an older vstream has only `admin.token`: its digest becomes
/// the store's first entry, and the file stays the admins' copy. A new one
/// gets a new token, written to `admin.token` for the local CLI.
pub fn ensure(data: &Path) -> Result<(), TokenError> {
    let store = data.join(STORE_FILE);
    if store.exists() {
        return read(data).map(drop);
    }
    let first = data.join(FIRST_TOKEN_FILE);
    let old = match std::fs::read_to_string(&first) {
        Ok(t) if !t.trim().is_empty() => Some(t.trim().to_owned()),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&first)(e)),
    };
    let token = match old {
        Some(t) => {
            tracing::info!(
                store = %store.display(),
                "the admin token is now kept as its SHA-256 only; {} is the admins' copy, \
                 not read by the server again",
                first.display()
            );
            t
        }
        None => {
            let t = vstream_pki::new_token();
            write_private(&first, &format!("{t}\n"))?;
            tracing::info!(
                path = %first.display(),
                "wrote a new admin token for the local CLI; the server keeps only its \
                 SHA-256, in {STORE_FILE}",
            );
            t
        }
    };
    write(
        data,
        &[Entry {
            name: FIRST_NAME.to_owned(),
            digest: vstream_pki::token_digest(&token),
        }],
    )
}

/// The file's identity and state: a change of any means it was rewritten.
type Stamp = (u64, u64, i64, i64);

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok((m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// The store as a running server holds it, read again when it changes.
#[derive(Debug)]
pub struct AdminTokens {
    path: PathBuf,
    current: RwLock<(Option<Stamp>, Vec<Entry>)>,
}

impl AdminTokens {
    /// Makes the store if it is not there yet ([`ensure`]) and reads it.
    pub fn open(data: &Path) -> Result<AdminTokens, TokenError> {
        ensure(data)?;
        let path = data.join(STORE_FILE);
        let at = stamp(&path).map_err(io(&path))?;
        let entries = read(data)?;
        if entries.is_empty() {
            tracing::warn!(
                path = %path.display(),
                "no admin token: the admin API refuses every call until \
                 `vstream token add NAME` makes one"
            );
        }
        Ok(AdminTokens {
            path,
            current: RwLock::new((Some(at), entries)),
        })
    }

    /// The name of the token `given` is, if the store holds it.
    pub fn check(&self, given: &str) -> Option<String> {
        self.refresh();
        let digest = vstream_pki::token_digest(given.trim());
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        // Every entry is compared, in constant time each.
        current.1.iter().fold(None, |found, e| {
            let hit = vstream_pki::constant_time_eq(digest.as_bytes(), e.digest.as_bytes());
            found.or(hit.then(|| e.name.clone()))
        })
    }

    /// Reads the store again if it changed. A store gone or unreadable
    /// keeps the last good set, with a warning: an admin mid-edit does not
    /// lock every admin out.
    fn refresh(&self) {
        let now = stamp(&self.path).ok();
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.0 == now {
                return;
            }
        }
        let text = std::fs::read_to_string(&self.path);
        let parsed = text
            .map_err(io(&self.path))
            .and_then(|t| parse(&self.path, &t));
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        match parsed {
            Ok(entries) => {
                tracing::info!(tokens = entries.len(), "read the admin tokens again");
                *current = (now, entries);
            }
            Err(e) => {
                tracing::warn!("keeping the admin tokens read before: {e}");
                current.0 = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_store_keeps_digests_and_the_first_token_only_in_its_copy() {
        let d = tempfile::tempdir().unwrap();
        let tokens = AdminTokens::open(d.path()).unwrap();
        let first = std::fs::read_to_string(d.path().join(FIRST_TOKEN_FILE)).unwrap();
        let first = first.trim();
        assert_eq!(first.len(), 64);
        let store = std::fs::read_to_string(d.path().join(STORE_FILE)).unwrap();
        assert!(!store.contains(first), "{store}");
        assert!(store.contains(&vstream_pki::token_digest(first)));
        for f in [STORE_FILE, FIRST_TOKEN_FILE] {
            let mode = std::fs::metadata(d.path().join(f)).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        assert_eq!(tokens.check(first).as_deref(), Some(FIRST_NAME));
        assert_eq!(
            tokens.check(&format!(" {first}\n")).as_deref(),
            Some("admin")
        );
        assert_eq!(tokens.check(&vstream_pki::token_digest(first)), None);
        assert_eq!(tokens.check(""), None);
    }

    #[test]
    fn an_older_data_folder_keeps_its_token() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FIRST_TOKEN_FILE), "old-token\n").unwrap();
        let tokens = AdminTokens::open(d.path()).unwrap();
        assert_eq!(tokens.check("old-token").as_deref(), Some("admin"));
        // The copy is left as it was.
        let copy = std::fs::read_to_string(d.path().join(FIRST_TOKEN_FILE)).unwrap();
        assert_eq!(copy, "old-token\n");
    }

    #[test]
    fn added_and_removed_tokens_count_at_the_next_check() {
        let d = tempfile::tempdir().unwrap();
        let tokens = AdminTokens::open(d.path()).unwrap();
        let ops = add(d.path(), "ops").unwrap();
        assert_eq!(tokens.check(&ops).as_deref(), Some("ops"));
        assert!(matches!(add(d.path(), "ops"), Err(TokenError::Exists(_))));
        assert!(matches!(add(d.path(), "a b"), Err(TokenError::BadName(_))));
        remove(d.path(), "ops").unwrap();
        assert_eq!(tokens.check(&ops), None);
        assert!(matches!(
            remove(d.path(), "ops"),
            Err(TokenError::NoSuch(_))
        ));
        let names: Vec<_> = read(d.path())
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["admin"]);
    }

    #[test]
    fn a_broken_store_is_a_clear_error_and_a_running_server_keeps_the_last() {
        let d = tempfile::tempdir().unwrap();
        let tokens = AdminTokens::open(d.path()).unwrap();
        let first = std::fs::read_to_string(d.path().join(FIRST_TOKEN_FILE)).unwrap();
        std::fs::write(d.path().join(STORE_FILE), "sha256:abc admin\n").unwrap();
        let e = AdminTokens::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("admin-tokens, line 1"), "{e}");
        assert!(e.contains("64 hex digits"), "{e}");
        assert_eq!(tokens.check(first.trim()).as_deref(), Some("admin"));
        let dup = format!("sha256:{0} a\nsha256:{0} a\n", "0".repeat(64));
        std::fs::write(d.path().join(STORE_FILE), dup).unwrap();
        let e = read(d.path()).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("second token"), "{e}");
    }
}
