//! A larger receive buffer for the queue's netlink socket. The kernel drops a packet it
//! cannot hand to that socket (counted only in /proc as `socket_full`); with the default
//! buffer (rmem_default, 208 KiB: a few hundred queued-packet messages) a 0 % loss run of
//! `longlink.sh` lost 2738 of 410 000 packets that way whenever this process waited for a
//! core on the shared machine. The `nfq` crate does not expose its socket, so it is found
//! by inode: the one netlink socket of protocol NETLINK_NETFILTER among this process's
//! descriptors.

use std::os::fd::BorrowedFd;

/// Protocol number of netfilter's netlink family (NETLINK_NETFILTER in linux/netlink.h).
const NETLINK_NETFILTER: &str = "12";

/// Bytes asked for as the receive buffer: the host's `net.core.rmem_max` caps it (4 MiB
/// here, about 20 times the default), and the kernel doubles what it grants for overhead.
pub const WANTED: usize = 4 << 20;

/// Grow the receive buffer of this process's netfilter netlink socket to `bytes` (capped by
/// `net.core.rmem_max`); returns what the kernel granted.
pub fn grow(bytes: usize) -> anyhow::Result<usize> {
    let table = std::fs::read_to_string("/proc/self/net/netlink")?;
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&NETLINK_NETFILTER)).then(|| f.last().map(|s| s.to_string()))?
        })
        .collect();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
        else {
            continue;
        };
        if !inodes.iter().any(|i| i == inode) {
            continue;
        }
        let fd: i32 = entry.file_name().to_string_lossy().parse()?;
        // SAFETY: `fd` is open for as long as this borrow lives: it is the queue's socket,
        // owned by the `nfq::Queue` the caller holds and does not drop meanwhile.
        let sock = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&sock);
        sock.set_recv_buffer_size(bytes)?;
        return Ok(sock.recv_buffer_size()?);
    }
    anyhow::bail!("no netfilter netlink socket among this process's descriptors")
}
