//! The cgroup programs: the egress filter (sock_addr connect4, connect6, sendmsg4, sendmsg6;
//! fw-ebpf's `egress.rs`) and the connection tracker that feeds the ingress program's reply
//! detection (cgroup_skb egress; fw-ebpf's `conntrack.rs`): loading them and attaching them to
//! a cgroup.
//!
//! The programs act on
//! every process in the cgroup v2 subtree they are attached to, so the attach point decides
//! the scope: the cgroup v2 root for the whole host, a test cgroup for a test. They are
//! attached as `bpf_link`s, which the kernel always treats as multi-attach (it rejects attach
//! flags on a cgroup `link_create`, hence `CgroupAttachMode::Single`, i.e. flags 0), so they
//! run alongside programs others (systemd, a container runtime) attach at the same or lower
//! cgroups; every program must allow for a call to proceed, so ours can only ever narrow what
//! others allow.
//!
//! Attaching makes kernel links (`bpf_link`, Linux 5.7+) and hands them to the caller as
//! [`CgroupLinks`]: dropping them detaches the programs, pinning them (`FdLink::pin`) keeps
//! the programs attached after this process exits, which is what the daemon's pinning path
//! does. The links are taken out of aya's program bookkeeping for that reason.
//!
//! The pinning path ([`Dataplane::attach_egress_pinned`]) pins one link per program as
//! `links/cgroup-<program>` under the bpffs root and records the cgroup directory in the
//! record's metadata. The kernel's link info (as aya 0.14 reads it) does not say which cgroup a
//! link is attached to, so the record is what tells a later apply whether the pinned links are
//! already where it wants them: same cgroup and every link running this data plane's program
//! means adopt (nothing is attached or detached, so there is no window without enforcement);
//! anything else means attach anew at the new cgroup first, then replace the old pins.
//! An adopted data plane (no object loaded by this process) opens its programs from their pins.

use std::fs::File;
use std::path::{Path, PathBuf};

use std::os::unix::fs::PermissionsExt as _;

use aya::Ebpf;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, CgroupSockAddrAttachType,
};
use fw_common::programs;

use crate::{Dataplane, Error};

/// The pin name of a cgroup link (under the root's `links/`).
pub(crate) const LINK_PREFIX: &str = "cgroup-";

/// The mount point of the cgroup v2 hierarchy, from `/proc/self/mountinfo` (the first
/// `cgroup2` mount; on a hybrid host that is e.g. `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Result<PathBuf, Error> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path)
        .map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    parse_mountinfo(&text).ok_or_else(|| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no cgroup2 mount"),
    })
}

/// The mount point of the first cgroup2 line of a mountinfo text. Fields: id, parent,
/// major:minor, root, mount point, options, optional fields..., "-", fs type, source, options.
fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mount = left.split(' ').nth(4)?;
        // mountinfo escapes space, tab, newline and backslash as octal.
        Some(PathBuf::from(
            mount
                .replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\"),
        ))
    })
}

/// One pinned cgroup link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupAttachment {
    pub program: &'static str,
    pub link_id: u32,
    pub program_id: u32,
    pub pin: PathBuf,
}

/// What [`Dataplane::attach_egress_pinned`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressAttachment {
    pub cgroup: PathBuf,
    /// False when the pinned links were already attached there and were adopted.
    pub attached: bool,
    /// Pins of links at another cgroup that were removed (detached).
    pub detached: Vec<PathBuf>,
    pub links: Vec<CgroupAttachment>,
}

/// Every program [`Dataplane::attach_egress`] attaches, in its order.
fn egress_names() -> impl Iterator<Item = &'static str> {
    programs::EGRESS.into_iter().chain([programs::CONNTRACK])
}

fn sock_addr_type(name: &str) -> CgroupSockAddrAttachType {
    match name {
        programs::CONNECT4 => CgroupSockAddrAttachType::Connect4,
        programs::CONNECT6 => CgroupSockAddrAttachType::Connect6,
        programs::SENDMSG4 => CgroupSockAddrAttachType::UDPSendMsg4,
        _ => CgroupSockAddrAttachType::UDPSendMsg6,
    }
}

fn link_err(path: &Path) -> impl FnOnce(aya::programs::links::LinkError) -> Error + '_ {
    move |e| Error::Link { path: path.to_path_buf(), source: Box::new(e) }
}

/// The cgroup links pinned under `root` (program name, pin), in [`egress_names`] order.
pub(crate) fn pinned_cgroup_links(root: &Path) -> Vec<(&'static str, PathBuf)> {
    egress_names()
        .map(|name| (name, root.join("links").join(format!("{LINK_PREFIX}{name}"))))
        .filter(|(_, p)| p.exists())
        .collect()
}

pub(crate) fn link_info(path: &Path) -> Result<(u32, u32), Error> {
    let link = PinnedLink::from_pin(path).map_err(link_err(path))?;
    let info = FdLink::from(link).info().map_err(link_err(path))?;
    Ok((info.id(), info.program_id()))
}

fn program_id(root: &Path, name: &'static str) -> Result<u32, Error> {
    let path = root.join(name);
    let program = if name == programs::CONNTRACK {
        CgroupSkb::from_pin(&path, CgroupSkbAttachType::Egress)
            .map_err(Error::program(name))?
            .info()
    } else {
        CgroupSockAddr::from_pin(&path, sock_addr_type(name)).map_err(Error::program(name))?.info()
    };
    Ok(program.map_err(Error::program(name))?.id())
}

/// Loads (verifies) every egress program of the object.
pub(crate) fn load_egress_programs(ebpf: &mut Ebpf) -> Result<(), Error> {
    for name in programs::EGRESS {
        sock_addr_program(ebpf, name)?.load().map_err(Error::program(name))?;
    }
    let name = programs::CONNTRACK;
    skb_program(ebpf, name)?.load().map_err(Error::program(name))
}

fn skb_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSkb, Error> {
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(Error::program(name))
}

fn sock_addr_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, Error> {
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(Error::program(name))
}

/// Programs attached to one cgroup, as kernel links. Dropping this detaches them (unless a
/// link was pinned: a pinned link lives on in bpffs).
#[derive(Debug)]
pub struct CgroupLinks {
    /// The cgroup directory they are attached to.
    pub cgroup: PathBuf,
    /// (program name, link): [`fw_common::programs::EGRESS`] in order, then
    /// [`fw_common::programs::CONNTRACK`].
    pub links: Vec<(&'static str, FdLink)>,
}

impl Dataplane {
    /// Attaches the egress programs (connect4/6, sendmsg4/6) and the connection tracker
    /// (cgroup_skb egress) to the cgroup v2 directory
    /// `cgroup` (e.g. `/sys/fs/cgroup` for every process on the host). The programs decide by
    /// the workload table of the active generation, whose cgroup ids must be resolved relative
    /// to the cgroup v2 root (see [`crate::workloads`]), wherever the programs are attached.
    /// On an error nothing stays attached.
    pub fn attach_egress(&mut self, cgroup: &Path) -> Result<CgroupLinks, Error> {
        self.exclusive = false;
        let dir = File::open(cgroup)
            .map_err(|source| Error::Io { path: cgroup.to_path_buf(), source })?;
        let Some(ebpf) = self.ebpf.as_mut() else {
            return self.attach_egress_from_pins(cgroup, &dir);
        };
        let mut links = Vec::with_capacity(programs::EGRESS.len() + 1);
        for name in programs::EGRESS {
            let program = sock_addr_program(ebpf, name)?;
            let id =
                program.attach(&dir, CgroupAttachMode::Single).map_err(Error::program(name))?;
            let link = program.take_link(id).map_err(Error::program(name))?;
            // Always an fd link on Linux 5.7+; older kernels (legacy prog_attach) are not
            // supported by the rest of the data plane either.
            let link = FdLink::try_from(link)
                .map_err(|e| Error::Link { path: cgroup.to_path_buf(), source: Box::new(e) })?;
            links.push((name, link));
        }
        let name = programs::CONNTRACK;
        let program = skb_program(ebpf, name)?;
        let id = program
            .attach(&dir, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
            .map_err(Error::program(name))?;
        let link = program.take_link(id).map_err(Error::program(name))?;
        let link = FdLink::try_from(link)
            .map_err(|e| Error::Link { path: cgroup.to_path_buf(), source: Box::new(e) })?;
        links.push((name, link));
        Ok(CgroupLinks { cgroup: cgroup.to_path_buf(), links })
    }
}

impl Dataplane {
    /// [`Dataplane::attach_egress`] for a data plane adopted from its pins: the programs are
    /// opened from their pins (`<root>/<program>`).
    fn attach_egress_from_pins(&mut self, cgroup: &Path, dir: &File) -> Result<CgroupLinks, Error> {
        let root = self.pin_root().ok_or(Error::MissingProgram(programs::CONNECT4))?.to_path_buf();
        let mut links = Vec::with_capacity(programs::EGRESS.len() + 1);
        for name in programs::EGRESS {
            let mut program = CgroupSockAddr::from_pin(root.join(name), sock_addr_type(name))
                .map_err(Error::program(name))?;
            let id = program.attach(dir, CgroupAttachMode::Single).map_err(Error::program(name))?;
            let link = program.take_link(id).map_err(Error::program(name))?;
            let link = FdLink::try_from(link).map_err(link_err(cgroup))?;
            links.push((name, link));
        }
        let name = programs::CONNTRACK;
        let mut program = CgroupSkb::from_pin(root.join(name), CgroupSkbAttachType::Egress)
            .map_err(Error::program(name))?;
        let id = program
            .attach(dir, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
            .map_err(Error::program(name))?;
        let link = program.take_link(id).map_err(Error::program(name))?;
        let link = FdLink::try_from(link).map_err(link_err(cgroup))?;
        links.push((name, link));
        Ok(CgroupLinks { cgroup: cgroup.to_path_buf(), links })
    }

    /// Attaches the egress programs and the connection tracker to `cgroup` and pins their
    /// links as `links/cgroup-<program>` (0600), recording the cgroup; see the module docs.
    /// When every link is already pinned, runs this data plane's program and the record names
    /// the same cgroup, nothing changes (`attached: false`). Otherwise the new links are
    /// attached and pinned first and the old pins are replaced, so enforcement never lapses.
    pub fn attach_egress_pinned(&mut self, cgroup: &Path) -> Result<EgressAttachment, Error> {
        self.exclusive = false;
        let root =
            self.pin_root().ok_or(Error::NotPinned(PathBuf::from("<unpinned>")))?.to_path_buf();
        let cgroup = std::fs::canonicalize(cgroup)
            .map_err(|source| Error::Io { path: cgroup.to_path_buf(), source })?;
        let wanted = cgroup.to_string_lossy().into_owned();
        let pinned = pinned_cgroup_links(&root);
        if pinned.len() == programs::EGRESS.len() + 1
            && self.recorded_cgroup()?.as_deref() == Some(wanted.as_str())
        {
            let mut links = Vec::new();
            for (name, pin) in &pinned {
                let (link_id, program_id_now) = link_info(pin)?;
                if program_id_now != program_id(&root, name)? {
                    break;
                }
                links.push(CgroupAttachment {
                    program: name,
                    link_id,
                    program_id: program_id_now,
                    pin: pin.clone(),
                });
            }
            if links.len() == pinned.len() {
                return Ok(EgressAttachment { cgroup, attached: false, detached: vec![], links });
            }
        }
        let fresh = self.attach_egress(&cgroup)?;
        let links_dir = root.join("links");
        let mut out = Vec::new();
        let mut detached = Vec::new();
        for (name, link) in fresh.links {
            let pin = links_dir.join(format!("{LINK_PREFIX}{name}"));
            let tmp = links_dir.join(format!("{LINK_PREFIX}{name}_new"));
            let _ = std::fs::remove_file(&tmp);
            link.pin(&tmp)
                .map_err(|source| Error::Pin { path: tmp.clone(), source: Box::new(source) })?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(|source| Error::Io { path: tmp.clone(), source })?;
            if pin.exists() {
                detached.push(pin.clone());
            }
            // Renaming over the old pin drops the kernel's last reference to the old link,
            // which detaches it: the new one is already running.
            std::fs::rename(&tmp, &pin)
                .map_err(|source| Error::Io { path: pin.clone(), source })?;
            let (link_id, program_id) = link_info(&pin)?;
            out.push(CgroupAttachment { program: name, link_id, program_id, pin });
        }
        self.set_cgroup(Some(&wanted))?;
        Ok(EgressAttachment { cgroup, attached: true, detached, links: out })
    }

    /// The pinned cgroup links (empty when none or not pinned).
    pub fn cgroup_attachments(&self) -> Result<Vec<CgroupAttachment>, Error> {
        let Some(root) = self.pin_root() else { return Ok(Vec::new()) };
        pinned_cgroup_links(root)
            .into_iter()
            .map(|(program, pin)| {
                let (link_id, program_id) = link_info(&pin)?;
                Ok(CgroupAttachment { program, link_id, program_id, pin })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_a_hybrid_mountinfo() {
        let text = "\
25 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
";
        assert_eq!(parse_mountinfo(text), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_mountinfo("25 1 8:1 / / rw - ext4 /dev/sda1 rw\n"), None);
    }
}
