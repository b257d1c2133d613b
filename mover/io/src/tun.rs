//! TUN devices and the socket options of the bench's emulated WAN link.
//!
//! The bench (`ferry bench`, bench/src/netns.rs) joins two network namespaces by a
//! TUN device in each and forwards every IP packet between the two descriptors
//! itself, later and at a set rate: a packet-level delay line, so that TCP runs
//! end to end and sees the link's real round-trip time (the kernel here has no
//! netem). This module holds the system calls that needs: creating a TUN device
//! (`TUNSETIFF`) and capping a socket's advertised window (`TCP_WINDOW_CLAMP`,
//! used by the link's tests to check that throughput is window / RTT); the line
//! waits for packets with [`crate::sys::wait_readable`] (nanosecond `ppoll`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `TUNSETIFF` = `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags of the union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}
const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

/// Creates (or attaches to) the TUN device `name` in the calling thread's network
/// namespace and returns its descriptor, non-blocking and close-on-exec. Each
/// read returns one IP packet (no packet-information header, `IFF_NO_PI`); each
/// write injects one. The device exists while the descriptor is open; it starts
/// down and without an address (the caller configures it with `ip`). Root (or
/// CAP_NET_ADMIN) only.
pub fn open_tun(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0 || b == b'/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TUN | IFF_NO_PI, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and writes back the name into) one `struct ifreq`
    // of 40 bytes; `req` is that size, laid out as the kernel's, and lives across the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// Caps the window a TCP socket advertises at `bytes` (`TCP_WINDOW_CLAMP`). Set on
/// a listening socket, the connections it accepts inherit it from their handshake.
pub fn set_tcp_window_clamp(sock: impl AsFd, bytes: u32) -> io::Result<()> {
    let v = bytes.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: setsockopt reads one c_int from a value that lives across the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_WINDOW_CLAMP,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for n in ["", "a/b", "0123456789abcdef"] {
            assert_eq!(open_tun(n).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{n:?}");
        }
    }

    #[test]
    fn a_tun_device_carries_packets_when_root() {
        if crate::process::effective_uid() != 0 || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipped: needs root and /dev/net/tun");
            return;
        }
        // In a fresh network namespace of its own thread, so that nothing else sees the device.
        std::thread::spawn(|| {
            let ns = std::process::Command::new("ip").args(["netns", "add", "ferry-io-tun-test"]).status().unwrap();
            assert!(ns.success());
            let f = File::open("/var/run/netns/ferry-io-tun-test").unwrap();
            crate::process::enter_network_namespace(&f).unwrap();
            let tun = open_tun("fiotest0").unwrap();
            // No packet yet: the precise wait times out after about the time asked.
            let t = Instant::now();
            assert!(!crate::sys::wait_readable(&tun, Duration::from_micros(1500)).unwrap());
            assert!(t.elapsed() >= Duration::from_micros(1500));
            let ip = |a: &[&str]| {
                let s = std::process::Command::new("ip").args(["-n", "ferry-io-tun-test"]).args(a).status().unwrap();
                assert!(s.success(), "ip {a:?}");
            };
            ip(&["addr", "add", "10.78.0.1/24", "dev", "fiotest0"]);
            ip(&["link", "set", "fiotest0", "up"]);
            // A UDP datagram to the device's subnet comes out of the descriptor as an IPv4 packet.
            let u = std::net::UdpSocket::bind("10.78.0.1:0").unwrap();
            u.send_to(b"hello", "10.78.0.2:9").unwrap();
            let mut buf = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(5);
            let pkt = loop {
                assert!(Instant::now() < deadline, "no packet from the tun device");
                crate::sys::wait_readable(&tun, Duration::from_millis(100)).unwrap();
                match std::io::Read::read(&mut &tun, &mut buf) {
                    Ok(n) if buf[0] >> 4 == 4 && buf[9] == 17 => break buf[..n].to_vec(),
                    _ => continue, // IPv6 router solicitations and the like
                }
            };
            assert_eq!(pkt.len(), 20 + 8 + 5);
            assert_eq!(&pkt[16..20], &[10, 78, 0, 2]);
            assert_eq!(&pkt[28..], b"hello");
            drop(tun);
            std::process::Command::new("ip").args(["netns", "del", "ferry-io-tun-test"]).status().unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn window_clamp_is_accepted_on_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        set_tcp_window_clamp(&l, 65536).unwrap();
    }
}
