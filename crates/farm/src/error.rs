//! Errors of the farm store.
//!
//! Every message reads as a sentence an operator can act on. [`FarmError::category`]
//! (and [`FarmError::http_status`]) let the HTTP layer map an error to a status
//! code without matching on variants.

use std::fmt;

/// Which kind of record an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    VDisk,
    Device,
    Server,
    Store,
    Token,
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordKind::VDisk => "vDisk",
            RecordKind::Device => "device",
            RecordKind::Server => "server",
            RecordKind::Store => "store",
            RecordKind::Token => "token",
        })
    }
}

/// What went wrong in the farm store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FarmError {
    /// The record named does not exist.
    #[error("{kind} {name} does not exist")]
    NotFound { kind: RecordKind, name: String },
    /// A record of that name exists already.
    #[error("{kind} {name} already exists")]
    AlreadyExists { kind: RecordKind, name: String },
    /// The request clashes with another record (a vDisk still assigned to
    /// devices, a MAC address another device has). The message says which.
    #[error("{0}")]
    InUse(String),
    /// The request itself is malformed (a bad name, a bad MAC, a reference to
    /// a vDisk that does not exist). The message says what.
    #[error("{0}")]
    Invalid(String),
    /// The storage underneath failed or holds something unreadable; the
    /// message says what the store was doing.
    #[error("the farm store failed: {0}")]
    Backend(String),
    /// Other writers kept changing the same records and the operation gave up
    /// after retrying; the message says which operation.
    #[error("{0}")]
    Conflict(String),
}

/// Coarse classes of [`FarmError`], one per way a caller reacts to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCategory {
    /// The record does not exist (HTTP 404).
    NotFound,
    /// The request clashes with the farm's current state (HTTP 409).
    Conflict,
    /// The request is malformed (HTTP 400).
    Invalid,
    /// The store failed; not the caller's fault (HTTP 500).
    Internal,
}

impl FarmError {
    /// A [`FarmError::Backend`] saying what the store was doing (`context`) and why it failed.
    pub fn backend(context: impl fmt::Display, err: impl fmt::Display) -> Self {
        FarmError::Backend(format!("{context}: {err}"))
    }

    /// Which class of error this is.
    pub fn category(&self) -> ErrorCategory {
        match self {
            FarmError::NotFound { .. } => ErrorCategory::NotFound,
            FarmError::AlreadyExists { .. } | FarmError::InUse(_) | FarmError::Conflict(_) => {
                ErrorCategory::Conflict
            }
            FarmError::Invalid(_) => ErrorCategory::Invalid,
            FarmError::Backend(_) => ErrorCategory::Internal,
        }
    }

    /// The HTTP status code that fits: 404, 409, 400 or 500.
    pub fn http_status(&self) -> u16 {
        match self.category() {
            ErrorCategory::NotFound => 404,
            ErrorCategory::Conflict => 409,
            ErrorCategory::Invalid => 400,
            ErrorCategory::Internal => 500,
        }
    }

    /// True when the caller's request caused the error (every category but `Internal`).
    pub fn is_client_error(&self) -> bool {
        self.category() != ErrorCategory::Internal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_statuses() {
        let e = FarmError::NotFound {
            kind: RecordKind::VDisk,
            name: "base".into(),
        };
        assert_eq!(e.to_string(), "vDisk base does not exist");
        assert_eq!(e.http_status(), 404);
        let e = FarmError::AlreadyExists {
            kind: RecordKind::Device,
            name: "pc1".into(),
        };
        assert_eq!(e.to_string(), "device pc1 already exists");
        assert_eq!(e.http_status(), 409);
        assert_eq!(FarmError::InUse("x".into()).http_status(), 409);
        assert_eq!(FarmError::Conflict("x".into()).http_status(), 409);
        assert_eq!(FarmError::Invalid("x".into()).http_status(), 400);
        let e = FarmError::backend("reading key vdisks/a", "disk on fire");
        assert_eq!(
            e.to_string(),
            "the farm store failed: reading key vdisks/a: disk on fire"
        );
        assert_eq!(e.http_status(), 500);
        assert!(!e.is_client_error());
        assert!(FarmError::Invalid("x".into()).is_client_error());
    }
}
