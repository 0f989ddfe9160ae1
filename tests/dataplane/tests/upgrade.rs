//! The ABI-change path under a flood: a data plane pinned by "an older build" (this build's
//! object, with the record's ABI field rewritten, which is all a process looks at), attached to
//! a veth pair's host end and to a test cgroup, enforcing a default-deny ingress policy while a
//! sender in the namespace floods denied UDP at a receiver on the host. The upgrade swaps every
//! link's program in place; the receiver must see none of the flood, the old programs must have
//! denied part of it and the new ones the rest (with no internal error: the new maps were full
//! before any packet reached them), the links keep their ids while the programs change, the
//! connection-tracking entries move over, and a normal apply works afterwards.

use fw_dataplane_tests::harness::PinRoot;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use fw_common::conntrack::{CT_FAMILY_V4, CT_STATE_ESTABLISHED, ConntrackKey, ConntrackValue};
use fw_common::{
    DIRECTION_INGRESS, STAT_ALWAYS_ARP, STAT_ALWAYS_ND, STAT_DEFAULT_DENY, STAT_INTERNAL_ERROR,
    STATS_PER_DIRECTION,
};
use fw_compiler::compile::compile;
use fw_compiler::encode::encode;
use fw_compiler::load::{Input, load};
use fw_compiler::mapstate::{Capacities, MapState};
use fw_compiler::model::HostIdentity;
use fw_compiler::yaml::ParseLimits;
use fw_dataplane_tests::harness::privileged;
use fw_loader::{ConntrackMigration, Dataplane, Desired, Error, Opened};
use fw_netkit::policies::{allow_port, ingress_allowing};
use fw_netkit::{Cgroup, Netns, Outcome, UdpEchoServer, UdpFlood, VethPair};

fn state(yaml: &str) -> MapState {
    let loaded = load([Input::new("p.yaml", yaml)], &ParseLimits::default());
    let set = loaded.policy_set.unwrap_or_else(|| panic!("{:?}", loaded.diagnostics));
    let host = HostIdentity { name: "h1".into(), ..HostIdentity::default() };
    compile(&set.for_host(&host), &Capacities::default()).expect("compiles")
}

/// Default deny; one unrelated allow (TCP to port 9) so the policy has a rule.
fn deny() -> String {
    ingress_allowing(&[&allow_port("discard", "tcp", 9)])
}

fn allow_udp(port: u16) -> String {
    ingress_allowing(&[&allow_port("udp", "udp", port)])
}

/// Makes the record under `root` name another ABI, as a root pinned by an older build would
/// (checking that it named this build's ABI before).
fn rewrite_recorded_abi(root: &Path, abi: &str) {
    let before = fw_loader::testing::rewrite_recorded_abi(root, abi).expect("rewrite the record");
    assert_eq!(before, fw_loader::abi_version());
}

/// The id of the program pinned under `root` as `name` (the old data plane's).
fn old_program(root: &Path, name: &str) -> u32 {
    use aya::programs::{CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, CgroupSockAddrAttachType};
    let path = root.join(name);
    let info = match name {
        "fw_ct_egress" => {
            CgroupSkb::from_pin(&path, CgroupSkbAttachType::Egress).expect("pin").info()
        }
        "fw_connect6" => {
            CgroupSockAddr::from_pin(&path, CgroupSockAddrAttachType::Connect6).expect("pin").info()
        }
        _ => CgroupSockAddr::from_pin(&path, CgroupSockAddrAttachType::UDPSendMsg4)
            .expect("pin")
            .info(),
    };
    info.expect("info").id()
}

fn stat(dp: &Dataplane, slot: u32) -> u64 {
    dp.stat(DIRECTION_INGRESS, slot).expect("stat").packets
}

/// Every ingress stats slot but default-deny, ARP and neighbour discovery (the namespace's
/// own traffic) that counted something.
fn other_stats(dp: &Dataplane) -> Vec<(u32, u64)> {
    (0..STATS_PER_DIRECTION)
        .filter(|s| ![STAT_DEFAULT_DENY, STAT_ALWAYS_ARP, STAT_ALWAYS_ND].contains(s))
        .map(|s| (s, stat(dp, s)))
        .filter(|(_, n)| *n != 0)
        .collect()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn an_abi_upgrade_swaps_programs_under_their_links_without_letting_a_packet_through() {
    if !privileged(
        "an_abi_upgrade_swaps_programs_under_their_links_without_letting_a_packet_through",
    ) {
        return;
    }
    let root = PinRoot::new("upgrade");
    let ns = Netns::new().expect("netns");
    let veth = VethPair::new(&ns).expect("veth");
    ns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"))
        .expect("ns")
        .expect("switch IPv6 off in the namespace");
    let cg = Cgroup::new().expect("cgroup");
    let host = IpAddr::V4(veth.host_v4());
    let peer = IpAddr::V4(veth.peer_v4());
    let sink = UdpEchoServer::start(SocketAddr::new(host, 0)).expect("sink");
    let port = sink.addr().port();
    let caps = Capacities::default();

    // The "older" data plane: default deny, XDP on the host end, egress on the test cgroup,
    // one tracked flow.
    let deny = state(&deny());
    let deny_enc = encode(&deny);
    let (mut old, opened) = Dataplane::open_pinned(&root.0, &caps).expect("load");
    assert_eq!(opened, Opened::Loaded);
    old.apply(&deny_enc, "old", &deny.digest(), b"old").expect("apply");
    let xdp = old.attach_xdp(veth.host_name()).expect("attach xdp");
    let egress = old.attach_egress_pinned(cg.dir()).expect("attach egress");
    assert!(egress.attached);
    let flow = ConntrackKey {
        family: CT_FAMILY_V4,
        proto: 6,
        local_port: 40000,
        remote_port: 5432,
        local: [10, 200, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        remote: [10, 200, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ..ConntrackKey::default()
    };
    let seen = fw_loader::conntrack::monotonic_ns();
    let value = ConntrackValue { last_seen_ns: seen, state: CT_STATE_ESTABLISHED, _pad: 0 };
    old.conntrack_insert(&flow, &value).expect("seed a flow");
    let old_ingress = old.ingress_program_id().expect("id");
    let old_links: Vec<(u32, u32)> = std::iter::once((xdp.link_id, xdp.program_id))
        .chain(egress.links.iter().map(|l| (l.link_id, l.program_id)))
        .collect();

    rewrite_recorded_abi(&root.0, "00000000deadbeef");
    assert!(matches!(Dataplane::adopt(&root.0), Err(Error::AbiMismatch { .. })));
    assert!(matches!(Dataplane::open_pinned(&root.0, &caps), Err(Error::AbiMismatch { .. })));

    // The flood, denied by the old programs.
    let flood = UdpFlood::start_in(&ns, SocketAddr::new(peer, 0), SocketAddr::new(host, port), 16)
        .expect("flood");
    wait_for("the old program to deny the flood", || stat(&old, STAT_DEFAULT_DENY) > 0);

    let desired = Desired {
        encoded: &deny_enc,
        workloads: None,
        revision: "new",
        digest: &deny.digest(),
        saved_state: b"new",
    };
    let t = Instant::now();
    let (new, upgrade) = Dataplane::upgrade_pinned(&root.0, &caps, &desired).expect("upgrade");
    let took = t.elapsed();
    let upgrade = upgrade.expect("the ABI differed: an upgrade, not an adoption");
    wait_for("the new program to deny the flood", || stat(&new, STAT_DEFAULT_DENY) > 0);
    std::thread::sleep(Duration::from_millis(100));
    let sent = flood.stop().expect("flood");

    // Nothing got through, and each generation of programs denied its share.
    assert_eq!(sink.received(), 0, "denied datagrams reached the receiver");
    let (by_old, by_new) = (stat(&old, STAT_DEFAULT_DENY), stat(&new, STAT_DEFAULT_DENY));
    assert_eq!(other_stats(&old), vec![], "the old program only denied");
    assert_eq!(other_stats(&new), vec![], "the new program only denied (no internal error)");
    assert_eq!(stat(&new, STAT_INTERNAL_ERROR), 0);

    // Same links, new programs.
    assert_eq!(upgrade.links.len(), old_links.len(), "{:?}", upgrade.links);
    let new_ingress = new.ingress_program_id().expect("id");
    assert_ne!(new_ingress, old_ingress);
    let now = fw_loader::attachments(&root.0).expect("attachments");
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].link_id, xdp.link_id, "the XDP link keeps its id");
    assert_eq!(now[0].program_id, new_ingress, "and runs the new program");
    let now_egress = new.cgroup_attachments().expect("cgroup links");
    assert_eq!(now_egress.len(), egress.links.len());
    for (before, after) in egress.links.iter().zip(&now_egress) {
        assert_eq!(after.link_id, before.link_id, "{} keeps its link", before.program);
        assert_ne!(after.program_id, before.program_id, "{} runs a new program", before.program);
    }
    for s in &upgrade.links {
        assert!(old_links.contains(&(s.link_id, s.old_program_id)), "{s:?}");
        assert_ne!(s.new_program_id, s.old_program_id);
    }

    // The record is this build's; the flow moved over.
    assert_eq!(upgrade.to_abi, fw_loader::abi_version());
    assert_eq!(upgrade.from_abi, "00000000deadbeef");
    assert!(matches!(upgrade.conntrack, ConntrackMigration::Copied(n) if n >= 1), "{upgrade:?}");
    let flows = new.conntrack_entries().expect("conntrack");
    assert!(flows.iter().any(|(k, v)| *k == flow && v.last_seen_ns == seen), "{flows:?}");
    drop(new);
    drop(old);
    let adopted = Dataplane::adopt(&root.0).expect("adopt the upgraded data plane");
    let status = adopted.status().expect("status");
    assert_eq!(status.abi, fw_loader::abi_version());
    assert_eq!(status.program_id, new_ingress);
    assert_eq!(
        adopted.saved_state(status.active_generation).expect("state"),
        Some(b"new".to_vec())
    );
    assert_eq!(adopted.read_generation(0).expect("g0"), adopted.read_generation(1).expect("g1"));
    drop(adopted);

    // A normal apply afterwards: adopted, same program, and it enforces.
    let (mut dp, opened) = Dataplane::open_pinned(&root.0, &caps).expect("open");
    assert_eq!(opened, Opened::Adopted);
    let allow = state(&allow_udp(port));
    dp.apply(&encode(&allow), "allow", &allow.digest(), b"").expect("apply");
    assert_eq!(dp.ingress_program_id().expect("id"), new_ingress);
    let echo = ns
        .run(move || {
            fw_netkit::udp_echo(SocketAddr::new(host, port), b"hi", Duration::from_secs(2))
        })
        .expect("ns");
    assert_eq!(echo, Outcome::Ok, "the applied policy allows the port");
    eprintln!(
        "upgrade took {took:?} under a flood of {} datagrams: old programs denied {by_old}, \
         new ones {by_new}, the receiver got 0; {} links swapped",
        sent.sent,
        upgrade.links.len()
    );
}

#[test]
fn an_upgrade_of_a_current_data_plane_adopts_it() {
    if !privileged("an_upgrade_of_a_current_data_plane_adopts_it") {
        return;
    }
    let root = PinRoot::new("upgrade-same");
    let caps = Capacities::default();
    let deny = state(&deny());
    let enc = encode(&deny);
    let dp = Dataplane::load_pinned(&root.0, &caps).expect("load");
    let id = dp.ingress_program_id().expect("id");
    let desired =
        Desired { encoded: &enc, workloads: None, revision: "r", digest: "d", saved_state: b"" };
    let (again, upgrade) = Dataplane::upgrade_pinned(&root.0, &caps, &desired).expect("upgrade");
    assert!(upgrade.is_none(), "same ABI: nothing is reloaded");
    assert_eq!(again.ingress_program_id().expect("id"), id);
}

#[test]
fn a_swap_that_fails_midway_swaps_the_done_links_back_and_leaves_the_old_data_plane() {
    if !privileged(
        "a_swap_that_fails_midway_swaps_the_done_links_back_and_leaves_the_old_data_plane",
    ) {
        return;
    }
    let root = PinRoot::new("upgrade-fail");
    let ns = Netns::new().expect("netns");
    let veth = VethPair::new(&ns).expect("veth");
    let cg = Cgroup::new().expect("cgroup");
    let caps = Capacities::default();
    let deny = state(&deny());
    let enc = encode(&deny);
    let (mut old, _) = Dataplane::open_pinned(&root.0, &caps).expect("load");
    old.apply(&enc, "old", &deny.digest(), b"old").expect("apply");
    let xdp = old.attach_xdp(veth.host_name()).expect("attach xdp");
    old.attach_egress_pinned(cg.dir()).expect("attach egress");
    // The connect4 pin now holds a connect6 link. The kernel would swap a connect4 program
    // onto it (it checks only the program type of a cgroup link); the upgrade refuses, after
    // XDP (swapped first) was swapped, which it must swap back.
    let other = cg.child("other").expect("child cgroup");
    let links = old.attach_egress(other.dir()).expect("attach at the child");
    let (_, connect6) = links
        .links
        .into_iter()
        .find(|(name, _)| *name == fw_common::programs::CONNECT6)
        .expect("a connect6 link");
    let pin = root.0.join("links").join(format!("cgroup-{}", fw_common::programs::CONNECT4));
    std::fs::remove_file(&pin).expect("unpin connect4");
    connect6.pin(&pin).expect("pin connect6 as connect4");
    rewrite_recorded_abi(&root.0, "00000000deadbeef");

    let desired =
        Desired { encoded: &enc, workloads: None, revision: "new", digest: "d", saved_state: b"" };
    let err = Dataplane::upgrade_pinned(&root.0, &caps, &desired).expect_err("the swap fails");
    assert!(matches!(&err, Error::LinkMismatch { path, .. } if *path == pin), "{err:?}");
    let now = fw_loader::attachments(&root.0).expect("attachments");
    assert_eq!(now[0].link_id, xdp.link_id);
    assert_eq!(now[0].program_id, xdp.program_id, "the XDP link runs the old program again");
    let staged: Vec<_> = std::fs::read_dir(&root.0)
        .expect("root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("_new"))
        .collect();
    assert_eq!(staged, Vec::<String>::new(), "no staged pins are left");
    assert!(matches!(Dataplane::adopt(&root.0), Err(Error::AbiMismatch { .. })), "old record");
    let cgroup_links: Vec<(u32, u32)> = ["fw_connect6", "fw_sendmsg4", "fw_ct_egress"]
        .iter()
        .map(|n| {
            let info = aya::programs::links::FdLink::from(
                aya::programs::links::PinnedLink::from_pin(
                    root.0.join("links").join(format!("cgroup-{n}")),
                )
                .expect("pinned link"),
            )
            .info()
            .expect("info");
            (info.program_id(), old_program(&root.0, n))
        })
        .collect();
    for (runs, pinned) in cgroup_links {
        assert_eq!(runs, pinned, "cgroup links after the failed one were never swapped");
    }
    let _ = (ns, other);
}
