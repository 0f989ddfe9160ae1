//! Self-tests of the kit against the real kernel (need root; CI runs them as root): with no
//! firewall loaded, traffic flows both ways over both families; guards clean up on panic;
//! cgroup placement and ids are right; parallel users do not collide.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fw_netkit::{
    Cgroup, Family, Netns, Outcome, TcpEchoServer, UdpEchoServer, VethPair, ping, require_root,
    tcp_connect, tcp_echo, udp_echo,
};

const T: Duration = Duration::from_secs(3);

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// The network namespace inode of the calling thread.
fn thread_netns() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()).unwrap_or(0)
}

#[test]
fn traffic_flows_both_ways_over_v4_and_v6() {
    if !require_root() {
        return;
    }
    let ns = Netns::new().unwrap();
    let veth = VethPair::new(&ns).unwrap();
    let me = thread_netns();
    assert_ne!(ns.run(thread_netns).unwrap(), me, "run() must execute inside the namespace");
    assert_eq!(thread_netns(), me, "the caller's thread must stay in its namespace");

    // The host end's ifindex is the one the root namespace reports.
    let sys_ifindex: u32 =
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", veth.host_name()))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    assert_eq!(veth.host_ifindex(), sys_ifindex);
    assert_ne!(veth.host_mac(), veth.peer_mac());

    for fam in Family::ALL {
        let (host, peer) = (veth.host_addr(fam), veth.peer_addr(fam));
        let payload = format!("hello {fam:?}").into_bytes();

        // host -> namespace
        let tcp_ns = TcpEchoServer::start_in(&ns, sa(peer, 0)).unwrap();
        let udp_ns = UdpEchoServer::start_in(&ns, sa(peer, 0)).unwrap();
        assert_eq!(tcp_connect(tcp_ns.addr(), T), Outcome::Ok, "{fam:?} tcp connect host->ns");
        assert_eq!(tcp_echo(tcp_ns.addr(), &payload, T), Outcome::Ok, "{fam:?} tcp host->ns");
        assert_eq!(udp_echo(udp_ns.addr(), &payload, T), Outcome::Ok, "{fam:?} udp host->ns");
        assert_eq!(ping(peer).unwrap(), Outcome::Ok, "{fam:?} ping host->ns");
        assert_eq!(tcp_ns.accepted(), 2);
        assert_eq!(udp_ns.received(), 1);

        // namespace -> host
        let tcp_host = TcpEchoServer::start(sa(host, 0)).unwrap();
        let udp_host = UdpEchoServer::start(sa(host, 0)).unwrap();
        let (ta, ua) = (tcp_host.addr(), udp_host.addr());
        let p = payload.clone();
        let got = ns
            .run(move || (tcp_echo(ta, &p, T), udp_echo(ua, &p, T), ping(host).unwrap()))
            .unwrap();
        assert_eq!(got, (Outcome::Ok, Outcome::Ok, Outcome::Ok), "{fam:?} ns->host");
        assert_eq!(tcp_host.accepted(), 1);
        assert_eq!(udp_host.received(), 1);

        // A closed port answers with RST (both directions).
        let closed = sa(peer, 9);
        assert_eq!(tcp_connect(closed, T), Outcome::Refused, "{fam:?} closed port");
        let closed_host = sa(host, 9);
        assert_eq!(ns.run(move || tcp_connect(closed_host, T)).unwrap(), Outcome::Refused);

        // Silence ends at the deadline, not later: an address in the subnet that nobody has
        // (neighbour resolution never completes) and a UDP port with no listener.
        let nobody = match fam {
            Family::V4 => IpAddr::from(veth.v4_net().hosts().nth(76).unwrap()),
            Family::V6 => IpAddr::from(veth.v6_net().hosts().nth(76).unwrap()),
        };
        let short = Duration::from_millis(300);
        let start = Instant::now();
        assert_eq!(tcp_connect(sa(nobody, 80), short), Outcome::TimedOut, "{fam:?}");
        assert_eq!(udp_echo(sa(peer, 9), b"x", short), Outcome::TimedOut, "{fam:?}");
        assert!(start.elapsed() < Duration::from_secs(2), "probes overran: {:?}", start.elapsed());
    }
}

#[test]
fn extra_peer_addresses_are_reachable() {
    if !require_root() {
        return;
    }
    let ns = Netns::new().unwrap();
    let veth = VethPair::new(&ns).unwrap();
    let v4: IpAddr = IpAddr::from(veth.v4_net().hosts().nth(9).unwrap());
    let v6: IpAddr = IpAddr::from(veth.v6_net().hosts().nth(9).unwrap());
    for extra in [v4, v6] {
        veth.add_peer_address(extra).unwrap();
        assert_eq!(ping(extra).unwrap(), Outcome::Ok, "{extra}");
    }
    assert!(veth.add_peer_address("192.0.2.7".parse().unwrap()).is_err());
}

#[test]
fn guards_clean_up_on_panic() {
    if !require_root() {
        return;
    }
    let mut seen: Option<(String, String, PathBuf, u32)> = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let ns = Netns::new().unwrap();
        let veth = VethPair::new(&ns).unwrap();
        let cg = Cgroup::new().unwrap();
        let nested = cg.child("app.service").unwrap();
        // Reaped with waitpid after the unwind, below (it must outlive this closure).
        #[allow(clippy::zombie_processes)]
        let child = nested.spawn(Command::new("sleep").arg("600")).unwrap();
        let _server = TcpEchoServer::start_in(&ns, sa(veth.peer_addr(Family::V4), 0)).unwrap();
        seen = Some((
            ns.name().to_string(),
            veth.host_name().to_string(),
            cg.dir().to_path_buf(),
            child.id(),
        ));
        // A panic inside the namespace thread reaches the test and still unwinds the guards.
        ns.run(|| panic!("deliberate panic inside the namespace")).unwrap();
    }));
    assert!(result.is_err(), "the closure must have panicked");
    let (ns_name, host_if, cg_dir, pid) = seen.expect("guards were made before the panic");
    assert!(!Path::new(&format!("/run/netns/{ns_name}")).exists(), "netns {ns_name} left behind");
    assert!(
        !Path::new(&format!("/sys/class/net/{host_if}")).exists(),
        "veth {host_if} left behind"
    );
    assert!(!cg_dir.exists(), "cgroup {} left behind", cg_dir.display());
    // The sleep was killed via cgroup.kill; it is a zombie until reaped, so reap it here.
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    let reaped = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
    assert_eq!(reaped, pid as i32);
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
}

#[test]
fn spawned_process_lands_in_the_cgroup() {
    if !require_root() {
        return;
    }
    let (mount, _) = fw_netkit::cgroup2_mount().unwrap();
    let cg = Cgroup::new().unwrap();
    let nested = cg.child("app.service").unwrap();
    assert_eq!(nested.path(), format!("{}/app.service", cg.path()));
    assert_eq!(nested.dir(), mount.join(nested.path()));

    let mut child = nested.spawn(Command::new("sleep").arg("600")).unwrap();
    let pid = child.id();
    assert_eq!(nested.procs().unwrap(), vec![pid]);
    assert!(cg.procs().unwrap().is_empty(), "the parent cgroup itself holds no process");
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(own.lines().any(|l| l == format!("0::/{}", nested.path())), "{own}");
    child.kill().unwrap();
    child.wait().unwrap();

    // The id is the directory inode, and the kernel's own notion of the cgroup id (the
    // 64-bit kernfs id in the cgroupfs file handle, which bpf_get_current_cgroup_id returns)
    // agrees.
    for c in [&cg, &nested] {
        assert_eq!(c.id(), std::fs::metadata(c.dir()).unwrap().ino());
        assert_eq!(c.id(), kernfs_id(c.dir()));
    }
    assert_ne!(cg.id(), nested.id());
}

/// The cgroup id from name_to_handle_at: cgroupfs encodes it as the 8-byte handle.
fn kernfs_id(dir: &Path) -> u64 {
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        id: [u8; 8],
    }
    let mut h = Handle { bytes: 8, kind: 0, id: [0; 8] };
    let mut mount_id = 0;
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: h is a file_handle with room for 8 handle bytes; path is NUL-terminated.
    let r = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            path.as_ptr(),
            (&raw mut h).cast(),
            &mut mount_id,
            0,
        )
    };
    assert_eq!(r, 0, "name_to_handle_at: {}", std::io::Error::last_os_error());
    assert_eq!(h.bytes, 8);
    u64::from_ne_bytes(h.id)
}

#[test]
fn cgroup_probes_run_from_inside_the_cgroup() {
    if !require_root() {
        return;
    }
    let ns = Netns::new().unwrap();
    let veth = VethPair::new(&ns).unwrap();
    let cg = Cgroup::new().unwrap();
    for fam in Family::ALL {
        let peer = veth.peer_addr(fam);
        let tcp = TcpEchoServer::start_in(&ns, sa(peer, 0)).unwrap();
        let udp = UdpEchoServer::start_in(&ns, sa(peer, 0)).unwrap();
        assert_eq!(cg.tcp_connect(tcp.addr(), T).unwrap(), Outcome::Ok, "{fam:?}");
        assert_eq!(cg.tcp_echo(tcp.addr(), b"in a cgroup", T).unwrap(), Outcome::Ok, "{fam:?}");
        assert_eq!(cg.udp_echo(udp.addr(), b"in a cgroup", T).unwrap(), Outcome::Ok, "{fam:?}");
        assert_eq!(cg.tcp_connect(sa(peer, 9), T).unwrap(), Outcome::Refused, "{fam:?}");
        assert_eq!(cg.ping(peer).unwrap(), Outcome::Ok, "{fam:?}");
        assert_eq!((tcp.accepted(), udp.received()), (2, 1));
        // From a thread in the namespace, the probe child is in the namespace too.
        let host = sa(veth.host_addr(fam), 0);
        let server = TcpEchoServer::start(host).unwrap();
        let a = server.addr();
        assert_eq!(ns.run(|| cg.tcp_echo(a, b"both", T)).unwrap().unwrap(), Outcome::Ok);
        assert_eq!(server.accepted(), 1);
    }
    // The probe child really sits in the cgroup while it works: probe an address nobody
    // answers (neighbour resolution never completes), and watch cgroup.procs meanwhile.
    let nobody = IpAddr::from(veth.v4_net().hosts().nth(76).unwrap());
    let (outcome, seen) = std::thread::scope(|s| {
        let probe = s.spawn(|| cg.tcp_connect(sa(nobody, 80), Duration::from_millis(800)));
        let mut seen = Vec::new();
        while !probe.is_finished() && seen.is_empty() {
            seen = cg.procs().unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        (probe.join().unwrap().unwrap(), seen)
    });
    assert_eq!(outcome, Outcome::TimedOut);
    assert_eq!(seen.len(), 1, "the probe child was never listed in cgroup.procs");
    assert_ne!(seen[0], std::process::id());
    assert!(cg.procs().unwrap().is_empty(), "the probe child must be gone afterwards");
}

#[test]
fn parallel_users_do_not_collide() {
    if !require_root() {
        return;
    }
    const N: usize = 6;
    // Everyone holds their guards until all have finished, so slots cannot be reused between
    // users and the distinctness checks below are meaningful.
    let barrier = std::sync::Barrier::new(N);
    let results: Vec<(String, String, u16, u64, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|_| {
                s.spawn(|| {
                    let ns = Netns::new().unwrap();
                    let veth = VethPair::new(&ns).unwrap();
                    let cg = Cgroup::new().unwrap();
                    let mut served = 0;
                    for fam in Family::ALL {
                        let server =
                            TcpEchoServer::start_in(&ns, sa(veth.peer_addr(fam), 7)).unwrap();
                        assert_eq!(tcp_echo(server.addr(), b"mine", T), Outcome::Ok);
                        assert_eq!(cg.tcp_echo(server.addr(), b"mine", T).unwrap(), Outcome::Ok);
                        served += server.accepted();
                    }
                    barrier.wait();
                    (
                        ns.name().to_string(),
                        veth.host_name().to_string(),
                        veth.slot(),
                        cg.id(),
                        served,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Each user reached its own servers (same port 7 everywhere, so a shared subnet would have
    // sent some connections to another user's server or failed to bind).
    assert!(results.iter().all(|r| r.4 == 4), "{results:?}");
    let distinct = |f: fn(&(String, String, u16, u64, usize)) -> String| {
        results.iter().map(f).collect::<HashSet<_>>().len()
    };
    assert_eq!(distinct(|r| r.0.clone()), N);
    assert_eq!(distinct(|r| r.1.clone()), N);
    assert_eq!(distinct(|r| r.2.to_string()), N);
    assert_eq!(distinct(|r| r.3.to_string()), N);
}
