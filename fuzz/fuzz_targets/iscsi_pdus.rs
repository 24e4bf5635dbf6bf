//! Feeds arbitrary bytes to the iSCSI PDU framing as a target reads them,
//! PDU after PDU, with a small MaxRecvDataSegmentLength; parses each as an
//! initiator's request and its text as login keys. Whatever parses must
//! encode back to a PDU that parses to the same request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_iscsi::{Pairs, Pdu, Request};

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
                    assert_eq!(Pairs::parse(&pairs.to_bytes()), Ok(pairs));
                }
            }
        }
    }
});
