//! The target's side of login key negotiation (RFC 7143 §6.2, §13): each
//! key the initiator offers gets an answer and a negotiated value, by the
//! key's rule (minimum, maximum, OR, AND, list, declarative).
//!
//! The session layer feeds every Login PDU's pairs to [`Negotiation::offer`]
//! and sends back the answers; names, the session type and the
//! authentication method are kept for it to act on (look up the target,
//! run CHAP), as it alone knows the farm.

use crate::text::{number, Pairs};

/// Status classes and details of a Login Response (RFC 7143 §11.13.5).
pub mod status {
    pub const SUCCESS: (u8, u8) = (0, 0);
    pub const MOVED_TEMPORARILY: (u8, u8) = (1, 1);
    pub const MOVED_PERMANENTLY: (u8, u8) = (1, 2);
    pub const INITIATOR_ERROR: (u8, u8) = (2, 0);
    pub const AUTHENTICATION_FAILURE: (u8, u8) = (2, 1);
    pub const AUTHORIZATION_FAILURE: (u8, u8) = (2, 2);
    pub const NOT_FOUND: (u8, u8) = (2, 3);
    pub const TARGET_REMOVED: (u8, u8) = (2, 4);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (2, 5);
    pub const TOO_MANY_CONNECTIONS: (u8, u8) = (2, 6);
    pub const MISSING_PARAMETER: (u8, u8) = (2, 7);
    pub const CANNOT_INCLUDE_IN_SESSION: (u8, u8) = (2, 8);
    pub const SESSION_TYPE_NOT_SUPPORTED: (u8, u8) = (2, 9);
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (2, 10);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (2, 11);
    pub const TARGET_ERROR: (u8, u8) = (3, 0);
    pub const SERVICE_UNAVAILABLE: (u8, u8) = (3, 1);
    pub const OUT_OF_RESOURCES: (u8, u8) = (3, 2);
}

/// Why a login cannot go on: the status to answer, and why (for the log;
/// never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginFailure {
    pub status: (u8, u8),
    pub why: String,
    /// Where the initiator should log in instead (`TargetAddress`, with a
    /// redirection status): `HOST:PORT,TPGT`.
    pub redirect: Option<String>,
}

impl LoginFailure {
    pub fn new(status: (u8, u8), why: impl Into<String>) -> LoginFailure {
        LoginFailure {
            status,
            why: why.into(),
            redirect: None,
        }
    }

    /// "Target moved temporarily" (RFC 7143 11.13.5): log in at `address`
    /// (`HOST:PORT,TPGT`) this time.
    pub fn moved(address: impl Into<String>, why: impl Into<String>) -> LoginFailure {
        LoginFailure {
            status: status::MOVED_TEMPORARILY,
            why: why.into(),
            redirect: Some(address.into()),
        }
    }
}

/// What the target offers: its own limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetLimits {
    /// The most data this target takes in one PDU.
    pub max_recv_data: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    /// Whether unsolicited data may be asked for (InitialR2T=No).
    pub allow_unsolicited: bool,
    pub allow_immediate: bool,
}

impl Default for TargetLimits {
    fn default() -> TargetLimits {
        TargetLimits {
            max_recv_data: 256 * 1024,
            max_burst: 1024 * 1024,
            first_burst: 256 * 1024,
            allow_unsolicited: true,
            allow_immediate: true,
        }
    }
}

/// The negotiated parameters of a session, starting from the RFC's
/// defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// The most data the target may send in one PDU: the initiator's
    /// MaxRecvDataSegmentLength.
    pub max_send_data: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u32,
    pub time2wait: u32,
    pub time2retain: u32,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            max_send_data: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            time2wait: 2,
            time2retain: 20,
        }
    }
}

/// The state of one login's negotiation.
#[derive(Debug, Clone, Default)]
pub struct Negotiation {
    pub limits: TargetLimits,
    pub params: Params,
    pub initiator_name: Option<String>,
    pub target_name: Option<String>,
    /// `Normal` or `Discovery` (Normal when not sent).
    pub session_type: Option<String>,
    /// The methods the initiator offered, in its order.
    pub auth_methods: Vec<String>,
    /// Keys answered so far: a key offered again is an error.
    answered: Vec<String>,
}

/// The keys the security stage handles (and the session layer with it).
const SECURITY_KEYS: [&str; 6] = [
    "AuthMethod",
    "CHAP_A",
    "CHAP_I",
    "CHAP_C",
    "CHAP_N",
    "CHAP_R",
];

fn yes_no(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yn(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

impl Negotiation {
    pub fn new(limits: TargetLimits) -> Negotiation {
        Negotiation {
            limits,
            ..Negotiation::default()
        }
    }

    /// Whether this is a discovery session.
    pub fn discovery(&self) -> bool {
        self.session_type.as_deref() == Some("Discovery")
    }

    /// Takes the initiator's `offered` pairs; returns the answers to the
    /// operational keys among them. Names, the session type and the
    /// authentication keys are kept, not answered: the session layer
    /// answers those.
    pub fn offer(&mut self, offered: &Pairs) -> Result<Pairs, LoginFailure> {
        let mut answers = Pairs::default();
        for (key, value) in &offered.0 {
            let bad = |why: &str| {
                LoginFailure::new(status::INITIATOR_ERROR, format!("{key}={value}: {why}"))
            };
            match key.as_str() {
                "InitiatorName" => self.initiator_name = Some(value.clone()),
                "TargetName" => self.target_name = Some(value.clone()),
                "InitiatorAlias" => {}
                "SessionType" => {
                    if value != "Normal" && value != "Discovery" {
                        return Err(LoginFailure::new(
                            status::SESSION_TYPE_NOT_SUPPORTED,
                            format!("SessionType={value}"),
                        ));
                    }
                    self.session_type = Some(value.clone());
                }
                "AuthMethod" => {
                    self.auth_methods = value.split(',').map(|s| s.trim().to_owned()).collect();
                }
                k if SECURITY_KEYS.contains(&k) => {}
                _ => {
                    if self.answered.iter().any(|a| a == key) {
                        return Err(bad("offered again"));
                    }
                    let answer = self.operational(key, value).map_err(|why| bad(&why))?;
                    self.answered.push(key.clone());
                    answers.push(key, answer);
                }
            }
        }
        Ok(answers)
    }

    /// The answer to operational key `key`, and its effect on the params.
    fn operational(&mut self, key: &str, value: &str) -> Result<String, String> {
        let num = |lo: u64, hi: u64| -> Result<u32, String> {
            match number(value) {
                Some(n) if (lo..=hi).contains(&n) => Ok(n as u32),
                _ => Err(format!("not a number from {lo} to {hi}")),
            }
        };
        let boolean = || yes_no(value).ok_or_else(|| "neither Yes nor No".to_owned());
        let p = &mut self.params;
        let l = &self.limits;
        Ok(match key {
            "HeaderDigest" | "DataDigest" => {
                if value.split(',').any(|d| d == "None") {
                    "None".into()
                } else {
                    "Reject".into()
                }
            }
            "MaxConnections" => {
                num(1, 65535)?;
                "1".into()
            }
            "InitialR2T" => {
                p.initial_r2t = boolean()? || !l.allow_unsolicited;
                yn(p.initial_r2t).into()
            }
            "ImmediateData" => {
                p.immediate_data = boolean()? && l.allow_immediate;
                yn(p.immediate_data).into()
            }
            "MaxRecvDataSegmentLength" => {
                // Declarative: the initiator's own limit; ours goes back.
                p.max_send_data = num(512, 16_777_215)?;
                l.max_recv_data.to_string()
            }
            "MaxBurstLength" => {
                p.max_burst = num(512, 16_777_215)?.min(l.max_burst);
                p.first_burst = p.first_burst.min(p.max_burst);
                p.max_burst.to_string()
            }
            "FirstBurstLength" => {
                p.first_burst = num(512, 16_777_215)?.min(l.first_burst).min(p.max_burst);
                p.first_burst.to_string()
            }
            "DefaultTime2Wait" => {
                // The larger wins; the target's own is 0.
                p.time2wait = num(0, 3600)?;
                p.time2wait.to_string()
            }
            "DefaultTime2Retain" => {
                // ErrorRecoveryLevel 0: nothing is kept for reinstatement.
                num(0, 3600)?;
                p.time2retain = 0;
                "0".into()
            }
            "MaxOutstandingR2T" => {
                num(1, 65535)?;
                p.max_outstanding_r2t = 1;
                "1".into()
            }
            "DataPDUInOrder" => {
                boolean()?;
                p.data_pdu_in_order = true;
                "Yes".into()
            }
            "DataSequenceInOrder" => {
                boolean()?;
                p.data_sequence_in_order = true;
                "Yes".into()
            }
            "ErrorRecoveryLevel" => {
                num(0, 2)?;
                p.error_recovery_level = 0;
                "0".into()
            }
            "IFMarker" | "OFMarker" => {
                boolean()?;
                "No".into()
            }
            "IFMarkInt" | "OFMarkInt" => "Irrelevant".into(),
            _ => "NotUnderstood".into(),
        })
    }

    /// What a Normal session's login must have said by the time it goes
    /// to full feature phase.
    pub fn check_complete(&self) -> Result<(), LoginFailure> {
        if self.initiator_name.is_none() {
            return Err(LoginFailure::new(
                status::MISSING_PARAMETER,
                "no InitiatorName",
            ));
        }
        if !self.discovery() && self.target_name.is_none() {
            return Err(LoginFailure::new(
                status::MISSING_PARAMETER,
                "a Normal session without TargetName",
            ));
        }
        Ok(())
    }

    /// Picks the authentication method: CHAP when the target needs it,
    /// else None if offered, else CHAP.
    pub fn choose_auth(&self, chap_required: bool) -> Result<&'static str, LoginFailure> {
        let offered = |m: &str| self.auth_methods.iter().any(|a| a == m);
        match (chap_required, offered("CHAP"), offered("None")) {
            (true, true, _) => Ok("CHAP"),
            (true, false, _) => Err(LoginFailure::new(
                status::AUTHENTICATION_FAILURE,
                "this target needs CHAP, which the initiator did not offer",
            )),
            (false, _, true) => Ok("None"),
            (false, true, false) => Ok("CHAP"),
            (false, false, false) => Err(LoginFailure::new(
                status::AUTHENTICATION_FAILURE,
                "no authentication method this target knows",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Pairs {
        let data: Vec<u8> = text.replace(' ', "\0").into_bytes();
        Pairs::parse(&data).unwrap()
    }

    #[test]
    fn ipxe_gets_the_r2t_path_it_asks_for() {
        // What iPXE sends, every key explicit.
        let mut n = Negotiation::new(TargetLimits::default());
        let a = n
            .offer(&pairs(
                "InitiatorName=iqn.2010-04.org.ipxe:pc1 TargetName=iqn.2026-12.org.vstream:device.pc1 \
                 SessionType=Normal AuthMethod=None HeaderDigest=None DataDigest=None \
                 MaxConnections=1 InitialR2T=Yes ImmediateData=No MaxRecvDataSegmentLength=8192 \
                 MaxBurstLength=262144 FirstBurstLength=65536 DefaultTime2Wait=0 \
                 DefaultTime2Retain=0 MaxOutstandingR2T=1 DataPDUInOrder=Yes \
                 DataSequenceInOrder=Yes ErrorRecoveryLevel=0",
            ))
            .unwrap();
        assert_eq!(a.get("InitialR2T"), Some("Yes"));
        assert_eq!(a.get("ImmediateData"), Some("No"));
        assert_eq!(a.get("MaxRecvDataSegmentLength"), Some("262144"));
        assert_eq!(a.get("HeaderDigest"), Some("None"));
        assert_eq!(a.get("TargetName"), None, "names are not answered");
        let p = &n.params;
        assert_eq!(p.max_send_data, 8192);
        assert_eq!((p.max_burst, p.first_burst), (262_144, 65_536));
        assert!(p.initial_r2t && !p.immediate_data);
        assert_eq!(n.choose_auth(false), Ok("None"));
        assert_eq!(n.check_complete(), Ok(()));
    }

    #[test]
    fn open_iscsi_gets_immediate_and_unsolicited_data() {
        let mut n = Negotiation::new(TargetLimits::default());
        n.offer(&pairs(
            "InitiatorName=iqn.x TargetName=iqn.y InitialR2T=No ImmediateData=Yes \
             MaxBurstLength=16776192 FirstBurstLength=262144 MaxRecvDataSegmentLength=262144",
        ))
        .unwrap();
        let p = &n.params;
        assert!(!p.initial_r2t && p.immediate_data);
        assert_eq!(p.max_burst, 1024 * 1024, "the target's limit wins");
        assert_eq!(p.first_burst, 256 * 1024);
    }

    #[test]
    fn bad_and_unknown_keys() {
        let mut n = Negotiation::new(TargetLimits::default());
        let a = n
            .offer(&pairs("X-com.example.Thing=1 IFMarkInt=1-2"))
            .unwrap();
        assert_eq!(a.get("X-com.example.Thing"), Some("NotUnderstood"));
        assert_eq!(a.get("IFMarkInt"), Some("Irrelevant"));
        let e = n.offer(&pairs("MaxBurstLength=12")).unwrap_err();
        assert_eq!(e.status, status::INITIATOR_ERROR);
        assert!(e.why.contains("MaxBurstLength=12"), "{e:?}");
        let e = n.offer(&pairs("InitialR2T=Maybe")).unwrap_err();
        assert!(e.why.contains("neither Yes nor No"), "{e:?}");
        n.offer(&pairs("ImmediateData=Yes")).unwrap();
        let e = n.offer(&pairs("ImmediateData=No")).unwrap_err();
        assert!(e.why.contains("offered again"), "{e:?}");
        let e = n.offer(&pairs("SessionType=Weird")).unwrap_err();
        assert_eq!(e.status, status::SESSION_TYPE_NOT_SUPPORTED);
        let a = Negotiation::default()
            .offer(&pairs("HeaderDigest=CRC32C"))
            .unwrap();
        assert_eq!(a.get("HeaderDigest"), Some("Reject"));
        assert_eq!(
            Negotiation::default().check_complete().unwrap_err().status,
            status::MISSING_PARAMETER
        );
    }

    #[test]
    fn authentication_method() {
        let mut n = Negotiation::default();
        n.offer(&pairs("AuthMethod=CHAP,None")).unwrap();
        assert_eq!(n.choose_auth(true), Ok("CHAP"));
        assert_eq!(n.choose_auth(false), Ok("None"));
        n.offer(&pairs("AuthMethod=None")).unwrap();
        assert_eq!(
            n.choose_auth(true).unwrap_err().status,
            status::AUTHENTICATION_FAILURE
        );
    }
}
