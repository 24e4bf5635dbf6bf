//! CHAP as iSCSI uses it (RFC 7143 §12.1.3, RFC 1994), with MD5, the one
//! algorithm every initiator offers (`CHAP_A=5`).
//!
//! ```text
//!   initiator                         target
//!   AuthMethod=CHAP[,None]  ------->
//!                           <-------  AuthMethod=CHAP
//!   CHAP_A=5                ------->
//!                           <-------  CHAP_A=5 CHAP_I=id CHAP_C=challenge
//!   CHAP_N=name CHAP_R=MD5(id‖secret‖challenge)
//!   [CHAP_I=id' CHAP_C=challenge'] ->  (mutual: the target proves itself too)
//!                           <-------  [CHAP_N=target CHAP_R=MD5(id'‖target secret‖challenge')]
//! ```
//!
//! The caller draws the identifier and the challenge (this crate has no
//! randomness) and keeps the secrets; nothing here logs.

use md5::{Digest, Md5};

/// The CHAP_A value of MD5.
pub const MD5: u8 = 5;
/// Length of the challenges a target sends: 16 bytes, as the Microsoft
/// initiator and open-iscsi send theirs.
pub const CHALLENGE_LEN: usize = 16;

/// The response to `challenge` with identifier `id` and `secret`.
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Whether `given` answers `challenge`, in time that does not depend on
/// where it differs.
pub fn verify(id: u8, secret: &[u8], challenge: &[u8], given: &[u8]) -> bool {
    constant_time_eq(given, &response(id, secret, challenge))
}

/// Whether `a` and `b` are equal, in time that does not depend on where
/// they differ (responses, names).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether an initiator's `CHAP_A` list offers MD5.
pub fn offers_md5(list: &str) -> bool {
    list.split(',').any(|a| a.trim() == "5")
}

/// Why a mutual-CHAP challenge from an initiator is refused.
pub fn check_initiator_challenge(sent: &[u8], received: &[u8]) -> Result<(), &'static str> {
    if received.is_empty() {
        return Err("an empty CHAP_C");
    }
    if received.len() > 1024 {
        return Err("a CHAP_C over 1024 bytes");
    }
    // The reflection attack: an initiator that sends back the target's own
    // challenge would have the target answer it for it.
    if received == sent {
        return Err("a CHAP_C identical to the target's own");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_matches_rfc_1994() {
        // MD5 of 0x01 ‖ "secret" ‖ 0x00..0f, worked out independently
        // (python3 hashlib).
        let challenge: Vec<u8> = (0..16).collect();
        let r = response(1, b"secret", &challenge);
        assert_eq!(crate::text::hex(&r), "0x740e86463bda3a4d7017d6e0fba0699d");
        assert!(verify(1, b"secret", &challenge, &r));
        assert!(!verify(2, b"secret", &challenge, &r));
        assert!(!verify(1, b"secreT", &challenge, &r));
        assert!(!verify(1, b"secret", &challenge, &r[..15]));
    }

    #[test]
    fn algorithm_lists_and_reflected_challenges() {
        assert!(offers_md5("5"));
        assert!(offers_md5("7,5"));
        assert!(!offers_md5("6,7"));
        let c = [1u8; 16];
        assert!(check_initiator_challenge(&c, &c).is_err());
        assert!(check_initiator_challenge(&c, &[]).is_err());
        assert!(check_initiator_challenge(&c, &[2; 16]).is_ok());
    }
}
