//! Parses arbitrary bytes as a datagram to the ProxyDHCP service, the way it
//! does (`parse_request`), then asks `decide` what to answer on either port.
//! Neither may panic. An answer must be a well-formed reply to that request:
//! a BOOTREPLY with the request's transaction id and hardware address, an
//! OFFER only to a DISCOVER on port 67 and an ACK only to a REQUEST on port
//! 4011, only to a PXE client, with the boot file it names; and it must encode
//! and decode back to itself.
#![no_main]
use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use libfuzzer_sys::fuzz_target;
use vstream_netboot::proxy_dhcp::{
    decide, format_mac, parse_request, AnswerContext, BootFiles, ClientKind, MAC_PLACEHOLDER,
    PXE_CLIENT_CLASS,
};

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse_request(data) else {
        return;
    };
    let ctx = AnswerContext {
        server_ip: Ipv4Addr::new(10, 0, 0, 1),
        // Longer than the 128-byte `file` field once the MAC is in: the reply
        // then carries it in option 67.
        script_url: format!(
            "http://10.0.0.1:7080/boot/ipxe?mac={MAC_PLACEHOLDER}&pad={}",
            "x".repeat(80)
        ),
        boot_files: BootFiles::default(),
    };
    for on_port_4011 in [false, true] {
        let Ok(answer) = decide(&request, on_port_4011, &ctx) else {
            continue;
        };
        let reply = &answer.message;
        assert_eq!(reply.opcode(), Opcode::BootReply);
        assert_eq!(reply.xid(), request.xid());
        assert_eq!(reply.chaddr(), request.chaddr());
        assert_eq!(answer.mac, format_mac(request.chaddr()));
        assert!(matches!(
            request.opts().get(OptionCode::ClassIdentifier),
            Some(DhcpOption::ClassIdentifier(c)) if c.starts_with(PXE_CLIENT_CLASS)
        ));
        let expected = match (request.opts().msg_type(), on_port_4011) {
            (Some(MessageType::Discover), false) => MessageType::Offer,
            (Some(MessageType::Request), true) => MessageType::Ack,
            other => panic!("answered {other:?}"),
        };
        assert_eq!(reply.opts().msg_type(), Some(expected));
        match answer.client {
            ClientKind::Ipxe => assert_eq!(
                answer.boot_file,
                ctx.script_url.replace(MAC_PLACEHOLDER, &answer.mac)
            ),
            ClientKind::Firmware => assert!(
                answer.boot_file == ctx.boot_files.bios
                    || answer.boot_file == ctx.boot_files.uefi_x64
            ),
        }
        let in_option = match reply.opts().get(OptionCode::BootfileName) {
            Some(DhcpOption::BootfileName(f)) => Some(f.as_slice()),
            _ => None,
        };
        let named = in_option.or(reply.fname()).unwrap_or_default();
        assert_eq!(named, answer.boot_file.as_bytes());

        let encoded = reply.to_vec().expect("the reply encodes");
        let mut decoded = Message::decode(&mut Decoder::new(&encoded)).expect("the reply decodes");
        // dhcproto decodes the `file` field with its terminating NUL.
        let trim = |f: Option<&[u8]>| f.map(|f| f.split(|&b| b == 0).next().unwrap_or(f).to_vec());
        assert_eq!(trim(decoded.fname()), trim(reply.fname()));
        match reply.fname() {
            Some(f) => decoded.set_fname(f),
            None => {
                decoded.clear_fname();
                &mut decoded
            }
        };
        assert_eq!(&decoded, reply, "round trip of the reply to {data:?}");
    }
});
