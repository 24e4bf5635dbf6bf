//! What the sessions of one logical unit share: its reservations.
//!
//! Two kinds live side by side, as SPC-4 lets them:
//!
//! - the SPC-2 RESERVE(6) reservation, held by one I_T nexus until it
//!   releases it, logs out, loses its connection, or a LUN reset;
//! - persistent reservations (SPC-4 §5.13): registrations (a key per I_T
//!   nexus), at most one reservation of one of six types, and the
//!   PRgeneration counter. They outlive the sessions that made them (an
//!   I_T nexus loss, a logout and a LUN reset leave them alone) and last
//!   as long as the server holds the logical unit: a server restart is the
//!   logical unit's power-on, which clears them (APTPL is not offered).
//!
//! An I_T nexus is the initiator's name and its session's ISID: two
//! sessions of one initiator are two nexuses, as for libiscsi's second
//! connection in its reservation tests.

use std::collections::HashMap;

use parking_lot::Mutex;
use vstream_iscsi::pr::{self, OutParams, Type};
use vstream_iscsi::scsi::{key, Command, Sense};

/// An I_T nexus: the initiator's name (lower-cased: iSCSI names compare
/// so) and its session's ISID.
pub type Nexus = (String, [u8; 6]);

/// Registrations one logical unit keeps, at most: they outlive sessions,
/// so an initiator that opens many and registers from each may not grow
/// them without bound.
pub const MAX_REGISTRATIONS: usize = 64;

/// Why a command is not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// RESERVATION CONFLICT status.
    Conflict,
    /// CHECK CONDITION with this sense.
    Sense(Sense),
}

/// Sense for reservation events (SPC-4 §5.13.11, unit attentions).
const RESERVATIONS_PREEMPTED: Sense = attention(0x2a, 0x03);
const RESERVATIONS_RELEASED: Sense = attention(0x2a, 0x04);
const REGISTRATIONS_PREEMPTED: Sense = attention(0x2a, 0x05);
const INVALID_RELEASE: Sense = Sense {
    key: key::ILLEGAL_REQUEST,
    asc: 0x26,
    ascq: 0x04,
};
const INSUFFICIENT_REGISTRATION_RESOURCES: Sense = Sense {
    key: key::ILLEGAL_REQUEST,
    asc: 0x55,
    ascq: 0x04,
};

const fn attention(asc: u8, ascq: u8) -> Sense {
    Sense {
        key: key::UNIT_ATTENTION,
        asc,
        ascq,
    }
}

/// A logical unit's shared state: one per target, the same `Arc` for
/// every session on it.
#[derive(Debug, Default)]
pub struct Lu {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The RESERVE(6) holder.
    spc2: Option<Nexus>,
    generation: u32,
    /// Registered nexuses and their keys, oldest first.
    registrations: Vec<(Nexus, u64)>,
    reservation: Option<Reservation>,
    /// A unit attention waiting for each nexus's next command.
    attentions: HashMap<Nexus, Sense>,
}

#[derive(Debug, Clone)]
struct Reservation {
    /// The nexus that made it (for an all-registrants type, every
    /// registered nexus holds it instead).
    holder: Nexus,
    ty: Type,
}

impl State {
    fn key_of(&self, nexus: &Nexus) -> Option<u64> {
        self.registrations
            .iter()
            .find(|(n, _)| n == nexus)
            .map(|(_, k)| *k)
    }

    fn holds(&self, nexus: &Nexus) -> bool {
        match &self.reservation {
            Some(r) if r.ty.all_registrants() => self.key_of(nexus).is_some(),
            Some(r) => r.holder == *nexus,
            None => false,
        }
    }

    /// Tells every registered nexus but `except` of `sense`.
    fn tell_registrants(&mut self, except: &Nexus, sense: Sense) {
        let others: Vec<Nexus> = self
            .registrations
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| n != except)
            .collect();
        for n in others {
            self.attentions.insert(n, sense);
        }
    }

    /// Removes `nexus`'s registration, and the reservation it held with it
    /// (an all-registrants one goes with the last registration).
    fn unregister(&mut self, nexus: &Nexus) {
        self.registrations.retain(|(n, _)| n != nexus);
        let Some(r) = self.reservation.clone() else {
            return;
        };
        if r.ty.all_registrants() {
            if self.registrations.is_empty() {
                self.reservation = None;
            }
        } else if r.holder == *nexus {
            self.reservation = None;
            // The registrants-only types tell the other registrants
            // their access changed (SPC-4 §5.13.11.2).
            if r.ty.registrants_enter() {
                self.tell_registrants(nexus, RESERVATIONS_RELEASED);
            }
        }
    }

    fn bump(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }
}

impl Lu {
    /// Whether `nexus` may run `cmd` now: a unit attention waiting for it
    /// comes first, then the SPC-2 reservation, then the persistent one.
    pub fn check(&self, nexus: &Nexus, cmd: &Command) -> Result<(), Refused> {
        let mut s = self.state.lock();
        // Nothing to check: the common case, a device alone on its disk.
        if s.spc2.is_none() && s.reservation.is_none() && s.attentions.is_empty() {
            return Ok(());
        }
        let reports_nothing = matches!(
            cmd,
            Command::Inquiry { .. } | Command::ReportLuns { .. } | Command::RequestSense { .. }
        );
        if !reports_nothing {
            if let Some(sense) = s.attentions.remove(nexus) {
                return Err(Refused::Sense(sense));
            }
        }
        if let Some(holder) = &s.spc2 {
            // Another nexus's RESERVE(6) keeps this one out of all but
            // the commands SPC-2 lets through.
            let exempt = matches!(
                cmd,
                Command::Inquiry { .. }
                    | Command::ReportLuns { .. }
                    | Command::RequestSense { .. }
                    | Command::Release6
                    | Command::TestUnitReady
                    | Command::ReportSupportedOpcodes { .. }
            );
            if holder != nexus && !exempt {
                return Err(Refused::Conflict);
            }
        }
        if let Some(r) = &s.reservation {
            if matches!(cmd, Command::Reserve6 | Command::Release6) {
                return Ok(()); // decided by reserve6 and release6
            }
            let registered = s.key_of(nexus).is_some();
            if !s.holds(nexus) && pr::conflicts(pr::access(cmd), r.ty, registered) {
                return Err(Refused::Conflict);
            }
        }
        Ok(())
    }

    /// The unit attention waiting for `nexus`, taken: REQUEST SENSE
    /// reports it (SPC-4 §5.12).
    pub fn take_attention(&self, nexus: &Nexus) -> Option<Sense> {
        self.state.lock().attentions.remove(nexus)
    }

    /// RESERVE(6): refused while another nexus holds it, or while any
    /// nexus is registered for persistent reservations.
    pub fn reserve6(&self, nexus: &Nexus) -> Result<(), Refused> {
        let mut s = self.state.lock();
        if !s.registrations.is_empty() {
            return Err(Refused::Conflict);
        }
        match &s.spc2 {
            Some(holder) if holder != nexus => Err(Refused::Conflict),
            _ => {
                s.spc2 = Some(nexus.clone());
                Ok(())
            }
        }
    }

    /// RELEASE(6): releases the reservation if `nexus` holds it (one from
    /// another nexus does nothing, and is GOOD); refused while any nexus
    /// is registered.
    pub fn release6(&self, nexus: &Nexus) -> Result<(), Refused> {
        let mut s = self.state.lock();
        if !s.registrations.is_empty() {
            return Err(Refused::Conflict);
        }
        if s.spc2.as_ref() == Some(nexus) {
            s.spc2 = None;
        }
        Ok(())
    }

    /// `nexus` is gone (logout, a lost connection): its RESERVE(6) goes
    /// with it, and what was waiting to be told to it. Its persistent
    /// registration stays (SPC-4 §5.13.1).
    pub fn lost(&self, nexus: &Nexus) {
        let mut s = self.state.lock();
        if s.spc2.as_ref() == Some(nexus) {
            s.spc2 = None;
        }
        s.attentions.remove(nexus);
    }

    /// LUN RESET or TARGET WARM RESET: the RESERVE(6) reservation ends;
    /// persistent reservations do not.
    pub fn reset(&self) {
        self.state.lock().spc2 = None;
    }

    /// PERSISTENT RESERVE IN data for `action` (all of it: the caller cuts
    /// it to the allocation length).
    pub fn persistent_in(&self, action: pr::In) -> Vec<u8> {
        let s = self.state.lock();
        match action {
            pr::In::ReadKeys => {
                let keys: Vec<u64> = s.registrations.iter().map(|(_, k)| *k).collect();
                pr::read_keys(s.generation, &keys)
            }
            pr::In::ReadReservation => {
                let r = s.reservation.as_ref().map(|r| {
                    let key = if r.ty.all_registrants() {
                        0
                    } else {
                        s.key_of(&r.holder).unwrap_or(0)
                    };
                    (key, r.ty)
                });
                pr::read_reservation(s.generation, r)
            }
            pr::In::ReportCapabilities => pr::report_capabilities(),
            pr::In::ReadFullStatus => {
                let all: Vec<pr::Registrant> = s
                    .registrations
                    .iter()
                    .map(|((name, isid), key)| pr::Registrant {
                        key: *key,
                        holds: s
                            .reservation
                            .as_ref()
                            .filter(|_| s.holds(&(name.clone(), *isid)))
                            .map(|r| r.ty),
                        initiator: name.clone(),
                        isid: *isid,
                        target_port: 1,
                    })
                    .collect();
                pr::read_full_status(s.generation, &all)
            }
        }
    }

    /// PERSISTENT RESERVE OUT `action` from `nexus`, with the CDB's scope
    /// and type and the decoded parameter list.
    pub fn persistent_out(
        &self,
        nexus: &Nexus,
        action: pr::Out,
        scope: u8,
        ty: u8,
        p: &OutParams,
    ) -> Result<(), Refused> {
        let invalid_cdb = Refused::Sense(Sense::INVALID_FIELD_IN_CDB);
        let invalid_param = Refused::Sense(Sense::INVALID_FIELD_IN_PARAMETERS);
        // The actions that name a reservation take LU scope and a type.
        let typed = || match Type::from_code(ty) {
            Some(t) if scope == 0 => Ok(t),
            _ => Err(invalid_cdb),
        };
        let mut s = self.state.lock();
        // An SPC-2 reservation of another nexus keeps it out (checked
        // before, in `check`); while one is held, registering is refused
        // too, so the two never mix.
        if s.spc2.as_ref().is_some_and(|h| h != nexus) {
            return Err(Refused::Conflict);
        }
        let mine = s.key_of(nexus);
        match action {
            pr::Out::Register | pr::Out::RegisterAndIgnoreExistingKey => {
                let ignore = action == pr::Out::RegisterAndIgnoreExistingKey;
                match mine {
                    None => {
                        if !ignore && p.key != 0 {
                            return Err(Refused::Conflict);
                        }
                        if p.sa_key == 0 {
                            // Nothing to register, nothing changed.
                            return Ok(());
                        }
                        if s.registrations.len() >= MAX_REGISTRATIONS {
                            return Err(Refused::Sense(INSUFFICIENT_REGISTRATION_RESOURCES));
                        }
                        s.registrations.push((nexus.clone(), p.sa_key));
                    }
                    Some(k) => {
                        if !ignore && p.key != k {
                            return Err(Refused::Conflict);
                        }
                        if p.sa_key == 0 {
                            s.unregister(nexus);
                        } else if let Some(r) = s.registrations.iter_mut().find(|(n, _)| n == nexus)
                        {
                            r.1 = p.sa_key;
                        }
                    }
                }
                s.bump();
                Ok(())
            }
            pr::Out::Reserve => {
                let t = typed()?;
                if mine != Some(p.key) {
                    return Err(Refused::Conflict);
                }
                match &s.reservation {
                    None => {
                        s.reservation = Some(Reservation {
                            holder: nexus.clone(),
                            ty: t,
                        });
                        Ok(())
                    }
                    // The holder asking again for the same: nothing to do.
                    Some(r) if s.holds(nexus) && r.ty == t => Ok(()),
                    Some(_) => Err(Refused::Conflict),
                }
            }
            pr::Out::Release => {
                let t = typed()?;
                if mine != Some(p.key) {
                    return Err(Refused::Conflict);
                }
                let Some(r) = s.reservation.clone() else {
                    return Ok(());
                };
                if !s.holds(nexus) {
                    return Ok(());
                }
                if r.ty != t {
                    return Err(Refused::Sense(INVALID_RELEASE));
                }
                s.reservation = None;
                if r.ty.registrants_enter() {
                    s.tell_registrants(nexus, RESERVATIONS_RELEASED);
                }
                Ok(())
            }
            pr::Out::Clear => {
                if mine != Some(p.key) {
                    return Err(Refused::Conflict);
                }
                s.tell_registrants(nexus, RESERVATIONS_PREEMPTED);
                s.registrations.clear();
                s.reservation = None;
                s.bump();
                Ok(())
            }
            pr::Out::Preempt | pr::Out::PreemptAndAbort => {
                let t = typed()?;
                if mine != Some(p.key) {
                    return Err(Refused::Conflict);
                }
                preempt(&mut s, nexus, t, p.sa_key, invalid_param)
            }
            // Moving a registration to another I_T nexus is not offered.
            pr::Out::RegisterAndMove => Err(invalid_cdb),
        }
    }
}

/// PREEMPT (and PREEMPT AND ABORT: this target runs each session's
/// commands one at a time, so no preempted command is left running to
/// abort) from registered `nexus`, of the registrations with `sa_key`
/// (SPC-4 §5.13.11.4).
fn preempt(
    s: &mut State,
    nexus: &Nexus,
    ty: Type,
    sa_key: u64,
    invalid_param: Refused,
) -> Result<(), Refused> {
    // Removes the registrations with `key` (but `nexus`'s own when
    // `spare`), telling each nexus removed.
    let remove = |s: &mut State, key: Option<u64>, spare: bool| -> usize {
        let gone: Vec<Nexus> = s
            .registrations
            .iter()
            .filter(|(n, k)| key.is_none_or(|key| *k == key) && !(spare && n == nexus))
            .map(|(n, _)| n.clone())
            .collect();
        s.registrations.retain(|(n, _)| !gone.contains(n));
        for n in &gone {
            s.attentions.insert(n.clone(), REGISTRATIONS_PREEMPTED);
        }
        gone.len()
    };
    let reservation = s.reservation.clone();
    match reservation {
        None => {
            if sa_key == 0 {
                return Err(invalid_param);
            }
            if remove(s, Some(sa_key), false) == 0 {
                return Err(Refused::Conflict);
            }
        }
        Some(r) if r.ty.all_registrants() => {
            if sa_key == 0 {
                // Everyone else goes, and `nexus` alone holds the new one.
                remove(s, None, true);
                s.reservation = Some(Reservation {
                    holder: nexus.clone(),
                    ty,
                });
            } else if remove(s, Some(sa_key), false) == 0 {
                return Err(Refused::Conflict);
            } else if s.registrations.is_empty() {
                s.reservation = None;
            }
        }
        Some(r) => {
            let holder_key = s.key_of(&r.holder);
            if holder_key == Some(sa_key) {
                // The holder is preempted: its reservation becomes
                // `nexus`'s, of the type asked.
                remove(s, Some(sa_key), true);
                s.reservation = Some(Reservation {
                    holder: nexus.clone(),
                    ty,
                });
            } else {
                if sa_key == 0 {
                    return Err(invalid_param);
                }
                if remove(s, Some(sa_key), false) == 0 {
                    return Err(Refused::Conflict);
                }
            }
        }
    }
    s.bump();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus(i: u8) -> Nexus {
        ("iqn.x:pc1".into(), [0x80, 0, 0, 0, 0, i])
    }

    fn params(key: u64, sa_key: u64) -> OutParams {
        OutParams {
            key,
            sa_key,
            ..Default::default()
        }
    }

    fn keys(lu: &Lu) -> (u32, Vec<u64>) {
        let d = lu.persistent_in(pr::In::ReadKeys);
        let gen = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        let keys = d[8..]
            .chunks(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        (gen, keys)
    }

    fn reservation(lu: &Lu) -> Option<(u64, u8)> {
        let d = lu.persistent_in(pr::In::ReadReservation);
        (d[7] != 0).then(|| (u64::from_be_bytes(d[8..16].try_into().unwrap()), d[21]))
    }

    fn out(lu: &Lu, n: &Nexus, a: pr::Out, ty: u8, key: u64, sa: u64) -> Result<(), Refused> {
        lu.persistent_out(n, a, 0, ty, &params(key, sa))
    }

    fn read() -> Command {
        Command::Read {
            at: Default::default(),
            fua: false,
        }
    }

    fn write() -> Command {
        Command::Write {
            at: Default::default(),
            fua: false,
            verify: false,
        }
    }

    #[test]
    fn register_counts_generations_and_refuses_a_wrong_key() {
        let lu = Lu::default();
        let a = nexus(1);
        // An unregistered nexus with key 0 and no new key: nothing.
        out(&lu, &a, pr::Out::Register, 0, 0, 0).unwrap();
        assert_eq!(keys(&lu), (0, vec![]));
        out(&lu, &a, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 7).unwrap();
        assert_eq!(keys(&lu), (1, vec![7]));
        // REGISTER of a registered nexus names its key.
        assert_eq!(
            out(&lu, &a, pr::Out::Register, 0, 0, 8),
            Err(Refused::Conflict)
        );
        out(&lu, &a, pr::Out::Register, 0, 7, 9).unwrap();
        assert_eq!(keys(&lu), (2, vec![9]));
        out(&lu, &a, pr::Out::Register, 0, 9, 0).unwrap();
        assert_eq!(keys(&lu), (3, vec![]));
        // An unregistered nexus naming a key is in conflict.
        assert_eq!(
            out(&lu, &a, pr::Out::Register, 0, 5, 6),
            Err(Refused::Conflict)
        );
    }

    #[test]
    fn registrations_are_bounded() {
        let lu = Lu::default();
        for i in 0..MAX_REGISTRATIONS {
            let n = (
                "iqn.x:pc1".to_string(),
                [0, 0, 0, 0, (i >> 8) as u8, i as u8],
            );
            out(&lu, &n, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 1).unwrap();
        }
        let n = ("iqn.x:pc1".to_string(), [1; 6]);
        assert_eq!(
            out(&lu, &n, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 1),
            Err(Refused::Sense(INSUFFICIENT_REGISTRATION_RESOURCES))
        );
    }

    #[test]
    fn each_type_lets_through_what_spc4_says() {
        // (type, registered other may read, may write, unregistered
        // other may read, may write).
        let table = [
            (3, false, false, false, false),
            (1, true, false, true, false),
            (6, true, true, false, false),
            (5, true, true, true, false),
            (8, true, true, false, false),
            (7, true, true, true, false),
        ];
        for (ty, rr, rw, ur, uw) in table {
            let lu = Lu::default();
            let (a, b) = (nexus(1), nexus(2));
            out(&lu, &a, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 1).unwrap();
            out(&lu, &b, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 2).unwrap();
            out(&lu, &a, pr::Out::Reserve, ty, 1, 0).unwrap();
            let key = if ty >= 7 { 0 } else { 1 };
            assert_eq!(reservation(&lu), Some((key, ty)));
            assert_eq!(lu.check(&a, &read()), Ok(()));
            assert_eq!(lu.check(&a, &write()), Ok(()));
            assert_eq!(lu.check(&b, &read()).is_ok(), rr, "type {ty}");
            assert_eq!(lu.check(&b, &write()).is_ok(), rw, "type {ty}");
            assert_eq!(lu.check(&b, &Command::TestUnitReady), Ok(()));
            out(&lu, &b, pr::Out::Register, 0, 2, 0).unwrap();
            assert_eq!(lu.check(&b, &read()).is_ok(), ur, "type {ty}");
            assert_eq!(lu.check(&b, &write()).is_ok(), uw, "type {ty}");
            // A RELEASE of another type is invalid; of its own, it ends.
            let other = if ty == 1 { 3 } else { 1 };
            assert_eq!(
                out(&lu, &a, pr::Out::Release, other, 1, 0),
                Err(Refused::Sense(INVALID_RELEASE))
            );
            out(&lu, &a, pr::Out::Release, ty, 1, 0).unwrap();
            assert_eq!(reservation(&lu), None);
            assert_eq!(lu.check(&b, &write()), Ok(()));
        }
    }

    #[test]
    fn a_holder_leaving_ends_its_reservation_but_all_registrants_share_one() {
        for (ty, shared) in [(3, false), (5, false), (8, true), (7, true)] {
            let lu = Lu::default();
            let (a, b) = (nexus(1), nexus(2));
            out(&lu, &a, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 1).unwrap();
            out(&lu, &b, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 2).unwrap();
            out(&lu, &a, pr::Out::Reserve, ty, 1, 0).unwrap();
            // Another reservation is refused while this one stands.
            assert_eq!(
                out(&lu, &b, pr::Out::Reserve, 1, 2, 0),
                Err(Refused::Conflict)
            );
            out(&lu, &a, pr::Out::Register, 0, 1, 0).unwrap();
            assert_eq!(reservation(&lu).is_some(), shared, "type {ty}");
            if shared {
                out(&lu, &b, pr::Out::Release, ty, 2, 0).unwrap();
                assert_eq!(reservation(&lu), None);
            } else if ty == 5 {
                // Registrants-only: the others hear of it.
                assert_eq!(
                    lu.check(&b, &Command::TestUnitReady),
                    Err(Refused::Sense(RESERVATIONS_RELEASED))
                );
            }
            assert_eq!(lu.check(&b, &Command::TestUnitReady), Ok(()));
        }
    }

    #[test]
    fn clear_ends_everything_in_one_generation() {
        let lu = Lu::default();
        let (a, b) = (nexus(1), nexus(2));
        out(&lu, &a, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 1).unwrap();
        out(&lu, &b, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 2).unwrap();
        out(&lu, &a, pr::Out::Reserve, 3, 1, 0).unwrap();
        let (gen, _) = keys(&lu);
        // An unregistered nexus may not clear.
        let c = nexus(3);
        assert_eq!(
            out(&lu, &c, pr::Out::Clear, 0, 0, 0),
            Err(Refused::Conflict)
        );
        out(&lu, &a, pr::Out::Clear, 0, 1, 0).unwrap();
        assert_eq!(keys(&lu), (gen + 1, vec![]));
        assert_eq!(reservation(&lu), None);
        assert_eq!(
            lu.check(&b, &read()),
            Err(Refused::Sense(RESERVATIONS_PREEMPTED))
        );
        assert_eq!(lu.check(&b, &read()), Ok(()));
        // REQUEST SENSE reports one, once.
        out(&lu, &b, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 2).unwrap();
        out(&lu, &a, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 1).unwrap();
        out(&lu, &a, pr::Out::Clear, 0, 1, 0).unwrap();
        assert_eq!(
            lu.check(
                &b,
                &Command::RequestSense {
                    descriptor: false,
                    alloc: 18
                }
            ),
            Ok(())
        );
        assert_eq!(lu.take_attention(&b), Some(RESERVATIONS_PREEMPTED));
        assert_eq!(lu.take_attention(&b), None);
    }

    #[test]
    fn preempt_removes_registrations_and_takes_the_reservation() {
        // Without a reservation: the registrations of the key go.
        let lu = Lu::default();
        let (a, b) = (nexus(1), nexus(2));
        out(&lu, &a, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 1).unwrap();
        out(&lu, &b, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 2).unwrap();
        let (gen, _) = keys(&lu);
        assert_eq!(
            out(&lu, &b, pr::Out::Preempt, 3, 2, 0),
            Err(Refused::Sense(Sense::INVALID_FIELD_IN_PARAMETERS))
        );
        assert_eq!(
            out(&lu, &b, pr::Out::Preempt, 3, 2, 99),
            Err(Refused::Conflict)
        );
        out(&lu, &b, pr::Out::Preempt, 3, 2, 1).unwrap();
        assert_eq!(keys(&lu), (gen + 1, vec![2]));
        assert_eq!(reservation(&lu), None);
        assert_eq!(
            lu.check(&a, &Command::TestUnitReady),
            Err(Refused::Sense(REGISTRATIONS_PREEMPTED))
        );

        // With one: the holder's goes, and the preempter holds it.
        out(&lu, &a, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 1).unwrap();
        out(&lu, &a, pr::Out::Reserve, 1, 1, 0).unwrap();
        out(&lu, &b, pr::Out::PreemptAndAbort, 3, 2, 1).unwrap();
        assert_eq!(reservation(&lu), Some((2, 3)));
        assert_eq!(keys(&lu).1, vec![2]);
        assert_eq!(lu.check(&b, &write()), Ok(()));
        assert!(lu.check(&a, &read()).is_err());
    }

    #[test]
    fn spc2_and_persistent_reservations_keep_apart() {
        let lu = Lu::default();
        let (a, b) = (nexus(1), nexus(2));
        lu.reserve6(&a).unwrap();
        assert_eq!(lu.check(&b, &read()), Err(Refused::Conflict));
        assert_eq!(
            out(&lu, &b, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 2),
            Err(Refused::Conflict)
        );
        // A LUN reset ends RESERVE(6), and so does losing the nexus.
        lu.reset();
        assert_eq!(lu.check(&b, &read()), Ok(()));
        lu.reserve6(&a).unwrap();
        lu.lost(&a);
        assert_eq!(lu.check(&b, &read()), Ok(()));
        // A registration keeps RESERVE(6) and RELEASE(6) out.
        out(&lu, &b, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 2).unwrap();
        assert_eq!(lu.reserve6(&a), Err(Refused::Conflict));
        assert_eq!(lu.release6(&a), Err(Refused::Conflict));
        // ...and persists through its nexus's loss and a LUN reset.
        out(&lu, &b, pr::Out::Reserve, 3, 2, 0).unwrap();
        lu.lost(&b);
        lu.reset();
        assert_eq!(reservation(&lu), Some((2, 3)));
        assert_eq!(keys(&lu).1, vec![2]);
    }

    #[test]
    fn full_status_names_each_registrant_and_the_holder() {
        let lu = Lu::default();
        let (a, b) = (nexus(1), nexus(2));
        out(&lu, &a, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 1).unwrap();
        out(&lu, &b, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 2).unwrap();
        out(&lu, &b, pr::Out::Reserve, 5, 2, 0).unwrap();
        let d = lu.persistent_in(pr::In::ReadFullStatus);
        let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, d.len() - 8);
        // Two descriptors: a's not holding, b's holding type 5.
        let first = &d[8..];
        let tid = u32::from_be_bytes(first[20..24].try_into().unwrap()) as usize;
        assert_eq!(first[12], 0);
        let second = &first[24 + tid..];
        assert_eq!(u64::from_be_bytes(second[0..8].try_into().unwrap()), 2);
        assert_eq!((second[12], second[13]), (1, 5));
    }

    #[test]
    fn bad_scope_type_and_register_and_move_are_refused() {
        let lu = Lu::default();
        let a = nexus(1);
        out(&lu, &a, pr::Out::RegisterAndIgnoreExistingKey, 0, 0, 1).unwrap();
        let bad = Err(Refused::Sense(Sense::INVALID_FIELD_IN_CDB));
        assert_eq!(out(&lu, &a, pr::Out::Reserve, 2, 1, 0), bad);
        assert_eq!(
            lu.persistent_out(&a, pr::Out::Reserve, 1, 1, &params(1, 0)),
            bad
        );
        assert_eq!(out(&lu, &a, pr::Out::RegisterAndMove, 1, 1, 2), bad);
        // A reserve with another key than the nexus's is a conflict.
        assert_eq!(
            out(&lu, &a, pr::Out::Reserve, 1, 5, 0),
            Err(Refused::Conflict)
        );
    }
}
