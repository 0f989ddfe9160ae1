//! Connection tracking on real traffic: the XDP program on the host end of a veth pair with a
//! default-deny ingress policy, the connection tracker attached to a test cgroup.
//!
//! What must hold (semantics rule 5): processes of the host (in the tracked cgroup) reach TCP
//! and UDP servers in the namespace and ping it, because the replies are recognised; an ICMP
//! error about a tracked flow passes as related; the namespace cannot reach the host except
//! where a rule allows it; the same traffic from a process whose flows are not tracked gets no
//! replies (so the replies above passed because of the tracker, not by accident). IPv4 and
//! IPv6.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use aya::programs::XdpMode;
use fw_common::{DIRECTION_INGRESS, STAT_ALWAYS_RELATED, STAT_ALWAYS_REPLY, STAT_DEFAULT_DENY};
use fw_compiler::compile::compile;
use fw_compiler::encode::encode;
use fw_compiler::load::{Input, load};
use fw_compiler::mapstate::{Capacities, MapState};
use fw_compiler::model::HostIdentity;
use fw_compiler::yaml::ParseLimits;
use fw_dataplane_tests::harness::privileged;
use fw_loader::Dataplane;
use fw_netkit::{
    Cgroup, Family, Netns, Outcome, TcpEchoServer, UdpEchoServer, VethPair, ping, tcp_connect,
    tcp_echo, udp_echo,
};

const T: Duration = Duration::from_secs(3);
/// For probes expected to time out (dropped), or whose answer does not matter.
const SHORT: Duration = Duration::from_millis(700);

fn compile_yaml(yaml: &str) -> MapState {
    let loaded = load([Input::new("test.yaml", yaml)], &ParseLimits::default());
    let set = loaded.policy_set.unwrap_or_else(|| panic!("{:#?}", loaded.diagnostics));
    let host = HostIdentity { name: "test-host".into(), labels: BTreeMap::new() };
    compile(&set.for_host(&host), &Capacities::default()).expect("compile")
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

#[test]
fn default_deny_ingress_passes_replies_and_related_errors_of_tracked_flows_only() {
    if !privileged("default_deny_ingress_passes_replies_and_related_errors_of_tracked_flows_only") {
        return;
    }
    let ns = Netns::new().unwrap();
    let veth = VethPair::new(&ns).unwrap();
    let cg = Cgroup::new().unwrap();

    // Host-side servers: one allowed by the policy, one not.
    let (h4, h6) = (veth.host_addr(Family::V4), veth.host_addr(Family::V6));
    let allowed4 = TcpEchoServer::start(sa(h4, 0)).unwrap();
    let allowed6 = TcpEchoServer::start(sa(h6, allowed4.addr().port())).unwrap();
    let yaml = format!(
        "apiVersion: fw/v1\nkind: Policy\nmetadata: {{name: ingress-ct}}\nspec:\n\
         \x20 defaults: {{ingress: deny}}\n  ingress:\n\
         \x20   - {{name: svc, action: allow, from: [{n4}, {n6}], proto: tcp, ports: [{port}]}}\n",
        n4 = veth.v4_net(),
        n6 = veth.v6_net(),
        port = allowed4.addr().port(),
    );
    let state = compile_yaml(&yaml);
    let mut dp = Dataplane::load(&Capacities::default()).expect("load the eBPF object");
    dp.write_generation(0, &encode(&state)).unwrap();
    dp.set_active_generation(0).unwrap();
    let _links = dp.attach_egress(cg.dir()).expect("attach cgroup programs");
    dp.ingress_program()
        .unwrap()
        .attach(veth.host_name(), XdpMode::default())
        .expect("attach XDP to the host end");

    for fam in Family::ALL {
        let (host, peer) = (veth.host_addr(fam), veth.peer_addr(fam));
        let allowed = if fam == Family::V4 { allowed4.addr() } else { allowed6.addr() };
        let tcp_ns = TcpEchoServer::start_in(&ns, sa(peer, 0)).unwrap();
        let udp_ns = UdpEchoServer::start_in(&ns, sa(peer, 0)).unwrap();
        let denied_tcp = TcpEchoServer::start(sa(host, 0)).unwrap();
        let denied_udp = UdpEchoServer::start(sa(host, 0)).unwrap();

        // Host -> namespace from the tracked cgroup: replies pass.
        let reply_before = dp.stat(DIRECTION_INGRESS, STAT_ALWAYS_REPLY).unwrap().packets;
        assert_eq!(cg.tcp_echo(tcp_ns.addr(), b"hello", T).unwrap(), Outcome::Ok, "{fam:?} tcp");
        assert_eq!(cg.udp_echo(udp_ns.addr(), b"hello", T).unwrap(), Outcome::Ok, "{fam:?} udp");
        assert_eq!(cg.ping(peer).unwrap(), Outcome::Ok, "{fam:?} ping");
        let replies = dp.stat(DIRECTION_INGRESS, STAT_ALWAYS_REPLY).unwrap().packets - reply_before;
        // SYN-ACK + echoed data (+ ACKs/FIN), one UDP datagram, one echo reply.
        assert!(replies >= 4, "{fam:?}: {replies} replies counted");

        // An ICMP port unreachable about a tracked UDP flow passes as related.
        let related_before = dp.stat(DIRECTION_INGRESS, STAT_ALWAYS_RELATED).unwrap().packets;
        let closed = sa(peer, 9);
        assert_eq!(cg.udp_echo(closed, b"x", SHORT).unwrap(), Outcome::TimedOut);
        let related = dp.stat(DIRECTION_INGRESS, STAT_ALWAYS_RELATED).unwrap().packets;
        assert_eq!(related - related_before, 1, "{fam:?} port unreachable is related");

        // The same from a process whose flows are not tracked: the replies are new packets,
        // denied by default (the test process is outside the cgroup).
        let deny_before = dp.stat(DIRECTION_INGRESS, STAT_DEFAULT_DENY).unwrap().packets;
        assert_eq!(tcp_connect(tcp_ns.addr(), SHORT), Outcome::TimedOut, "{fam:?} untracked");
        assert_eq!(udp_echo(udp_ns.addr(), b"x", SHORT), Outcome::TimedOut, "{fam:?} untracked");
        let denied = dp.stat(DIRECTION_INGRESS, STAT_DEFAULT_DENY).unwrap().packets - deny_before;
        assert!(denied >= 2, "{fam:?}: untracked replies denied ({denied})");

        // Namespace -> host: only the allowed service.
        let (dt, du) = (denied_tcp.addr(), denied_udp.addr());
        let got = ns
            .run(move || {
                (
                    tcp_echo(allowed, b"in", T),
                    tcp_connect(dt, SHORT),
                    udp_echo(du, b"in", SHORT),
                    ping(host).unwrap(),
                )
            })
            .unwrap();
        assert_eq!(
            got,
            (Outcome::Ok, Outcome::TimedOut, Outcome::TimedOut, Outcome::TimedOut),
            "{fam:?} ns->host"
        );
        assert_eq!(denied_tcp.accepted(), 0);
        assert_eq!(denied_udp.received(), 0);
    }
    let svc = state
        .rules
        .iter()
        .find(|(_, r)| r.name.as_deref() == Some("svc"))
        .map(|(id, _)| id.0)
        .unwrap();
    assert!(dp.rule_counters().unwrap().get(&svc).is_some_and(|c| c.packets >= 2));
}
