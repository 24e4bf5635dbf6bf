//! Subnets written ADDRESS/PREFIX, as servers advertise them for login affinity.

use std::net::IpAddr;

/// Parses ADDRESS/PREFIX.
pub fn parse_cidr(net: &str) -> Option<(IpAddr, u8)> {
    let (addr, bits) = net.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let bits: u8 = bits.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some((addr, bits))
}

/// Whether `ip` lies in subnet `net` (ADDRESS/PREFIX).
pub fn in_cidr(ip: IpAddr, net: &str) -> bool {
    let Some((addr, bits)) = parse_cidr(net) else {
        return false;
    };
    let (a, b, width) = match (ip, addr) {
        (IpAddr::V4(x), IpAddr::V4(y)) => (u128::from(u32::from(x)), u128::from(u32::from(y)), 32),
        (IpAddr::V6(x), IpAddr::V6(y)) => (u128::from(x), u128::from(y), 128),
        (IpAddr::V6(x), IpAddr::V4(y)) => match x.to_ipv4_mapped() {
            Some(x) => (u128::from(u32::from(x)), u128::from(u32::from(y)), 32),
            None => return false,
        },
        _ => return false,
    };
    let shift = width - u32::from(bits);
    shift >= width || (a >> shift) == (b >> shift)
}
