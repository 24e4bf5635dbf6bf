//! Feeds arbitrary bytes to the iSCSI PDU framing as a target reads them,
//! PDU after PDU, with a small MaxRecvDataSegmentLength; parses each as an
//! initiator's request, its text as login keys, and a SCSI command's CDB
//! and data as the target would. Whatever parses must encode back to a
//! PDU that parses to the same request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_iscsi::login::Negotiation;
use vstream_iscsi::scsi::{self, Command, Limits, ModeInfo};
use vstream_iscsi::{Pairs, Pdu, Request};

const LIMITS: Limits = Limits {
    max_transfer: 2048,
    optimal_transfer: 256,
    unmap: true,
    max_unmap_blocks: 1 << 20,
    max_unmap_descriptors: 64,
    unmap_granularity: 8,
    max_write_same: 1 << 20,
    unmapped_read_zero: true,
    physical_exponent: 3,
};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((pdu, used))) = Pdu::decode(rest, 8192) {
        assert!(used >= vstream_iscsi::BHS_LEN && used <= rest.len());
        rest = &rest[used..];
        if let Ok(req) = Request::parse(pdu) {
            let again = req.to_pdu();
            let bytes = again.to_bytes();
            let (pdu, n) = Pdu::decode(&bytes, 1 << 24)
                .expect("an encoded request frames")
                .expect("whole");
            assert_eq!(n, bytes.len());
            assert_eq!(Request::parse(pdu).expect("parses again"), req);
            if let Request::Login(l) = &req {
                if let Ok(pairs) = Pairs::parse(&l.data) {
                    assert_eq!(Pairs::parse(&pairs.to_bytes()), Ok(pairs.clone()));
                    let mut n = Negotiation::default();
                    if n.offer(&pairs).is_ok() {
                        let p = &n.params;
                        assert!(p.first_burst <= p.max_burst);
                        assert!(p.max_send_data >= 512);
                    }
                }
            }
            if let Request::ScsiCommand(c) = &req {
                let blocks = 1u64 << 21;
                match Command::parse(&c.cdb) {
                    Ok(cmd @ Command::ModeSense { .. }) => {
                        let info = ModeInfo {
                            blocks,
                            block_len: 512,
                            read_only: false,
                            write_cache: true,
                        };
                        let _ = scsi::mode_sense(&cmd, &info);
                    }
                    Ok(Command::Inquiry {
                        evpd: true, page, ..
                    }) => {
                        let id = scsi::Identity {
                            vendor: "VSTREAM".into(),
                            product: "fuzz".into(),
                            revision: "1".into(),
                            serial: "s".into(),
                            naa: [0x60; 16],
                        };
                        let _ = scsi::vpd_page(page, &id, &LIMITS);
                    }
                    Ok(Command::Unmap { .. }) => {
                        if let Ok(runs) = scsi::unmap_descriptors(&c.data, blocks, &LIMITS) {
                            assert!(runs.iter().all(|r| r.lba + r.blocks as u64 <= blocks));
                        }
                    }
                    Ok(Command::PersistentReserveOut { len, .. }) => {
                        if let Ok(p) = vstream_iscsi::pr::out_params(&c.data, len) {
                            let again = vstream_iscsi::pr::encode_out_params(&p);
                            assert_eq!(vstream_iscsi::pr::out_params(&again, len), Ok(p));
                        }
                    }
                    Ok(Command::Read { at, .. } | Command::Write { at, .. }) => {
                        let _ = scsi::check_range(at, blocks);
                    }
                    _ => {}
                }
            }
        }
    }
});
