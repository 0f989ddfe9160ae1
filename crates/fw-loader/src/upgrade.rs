//! The ABI-change path: replacing the pinned programs and maps with this build's when the
//! pinned ones were built from a different object ([`crate::abi_version`] differs), without a
//! moment in which a packet or a connection goes unfiltered.
//!
//! Why it is built this way ([`Dataplane::upgrade_pinned`], all under the root's lock):
//! 1. Only a change of the ABI reloads programs; with the same ABI the pins are adopted and
//!    program ids never change.
//! 2. The new object is loaded and its maps made by this process, and both generations are
//!    filled with the caller's desired state by the ordinary apply protocol (write, verify,
//!    flip, replay) before any packet can reach them. The old maps cannot be reused: a changed
//!    ABI may mean changed layouts, which is the point of the hash.
//! 3. The new programs and maps are pinned under temporary names (`<name>_new`) first, so a
//!    failure up to here leaves the old data plane exactly as it was (the temporary pins are
//!    removed).
//! 4. Connection tracking: when the record's conntrack layout ([`crate::pin::conntrack_layout`])
//!    equals this build's, the entries are copied into the new table, once before the links are
//!    swapped and once after (only keys the new table lacks, so fresher entries the new tracker
//!    wrote win). Entries the old tracker writes in between the second copy and its own swap are
//!    the only ones lost. When the layout differs (or the record predates the field) nothing is
//!    copied: the new programs start with an empty table, so replies to connections the host
//!    opened before the upgrade are judged by the ingress policy like any packet until the host
//!    sends on the connection again (the egress tracker records every outgoing packet). Under a
//!    default-deny ingress policy such replies are dropped for that time.
//! 5. Every pinned link (XDP per interface, the cgroup sock_addr and cgroup_skb links) has its
//!    program swapped in place with `BPF_LINK_UPDATE`, with the program the link runs now as
//!    the expected old program (`BPF_F_REPLACE`, so a concurrent change is refused rather than
//!    overwritten). The kernel swaps the program pointer of the attachment atomically: each
//!    packet runs either the old program on the old maps or the new program on the new maps,
//!    and there is no instant without a program. Links keep their ids; a failure swaps the
//!    links already done back. For a cgroup link the kernel checks only the program type, not
//!    the attach type (it would put a connect4 program on a connect6 hook), so each link's
//!    type and attach type are checked against the program before its swap.
//! 6. The temporary pins are renamed over the old ones (a rename on bpffs replaces its target
//!    atomically), the record last: its ABI field is what tells the next process the upgrade is
//!    complete. Pins the new object no longer has are removed. The old programs and maps are
//!    freed by the kernel when their last reference (pin, link, this process's fds) is gone.
//!    Should a step after the swap fail, the links run the new programs while the pins and the
//!    record are still the old ones; the record then still names the old ABI, so running the
//!    upgrade again (which swaps each link from whatever program it runs) finishes the job.
//!
//! The rule counters and stats start at zero with the new maps (the old ones are not carried
//! over: their layout may be what changed).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData};
use aya_obj::generated::{
    BPF_F_REPLACE, bpf_attach_type, bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type,
};
use fw_common::conntrack::{ConntrackKey, ConntrackValue};
use fw_common::{GENERATIONS, maps, programs};
use fw_compiler::encode::Encoded;
use fw_compiler::mapstate::Capacities;

use crate::apply::write_id;
use crate::pin::{
    LINKS, META, Pins, RECORD, abi_version, attachments, conntrack_layout, io, lock_root,
    open_pinned_map,
};
use crate::{ApplyReport, Dataplane, Error};

/// The suffix of the pins an upgrade makes before renaming them into place.
const STAGED: &str = "_new";

/// The state an upgrade fills the new maps with: the arguments of
/// [`Dataplane::apply_with_workloads`].
#[derive(Clone, Copy, Debug)]
pub struct Desired<'a> {
    pub encoded: &'a Encoded,
    pub workloads: Option<&'a BTreeMap<u64, u32>>,
    pub revision: &'a str,
    pub digest: &'a str,
    pub saved_state: &'a [u8],
}

/// One link whose program an upgrade swapped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwappedLink {
    pub pin: PathBuf,
    /// The program name (`fw_common::programs`).
    pub program: &'static str,
    pub link_id: u32,
    pub old_program_id: u32,
    pub new_program_id: u32,
}

/// What happened to the connection-tracking entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConntrackMigration {
    /// The layouts matched: this many entries were copied (both passes).
    Copied(usize),
    /// The layouts differ (or the pinned record has none): the new table started empty.
    Dropped { pinned: Option<String>, embedded: String },
}

/// What [`Dataplane::upgrade_pinned`] did.
#[derive(Clone, Debug)]
pub struct Upgrade {
    pub from_abi: String,
    pub to_abi: String,
    pub links: Vec<SwappedLink>,
    pub conntrack: ConntrackMigration,
    /// The apply that filled the new maps.
    pub apply: ApplyReport,
}

/// `bpf(2)`.
fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr for the whole call; the kernel
    // reads at most `size_of::<bpf_attr>()` bytes of it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

fn owned_fd(rc: i64) -> std::io::Result<OwnedFd> {
    let fd = i32::try_from(rc).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_OBJ_GET`: a new fd for the object pinned at `path`.
fn obj_get(path: &Path) -> Result<OwnedFd, Error> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other("a NUL in the path"),
    })?;
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr).and_then(owned_fd).map_err(io(path))
}

/// `BPF_PROG_GET_FD_BY_ID`.
fn prog_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_6.__bindgen_anon_1.prog_id = id;
    sys_bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &mut attr).and_then(owned_fd)
}

/// `BPF_LINK_UPDATE` with `BPF_F_REPLACE`: the link runs `new` from now on, provided it ran
/// `expected` until now (else `EPERM` and nothing changes).
fn link_update(
    link: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    expected: BorrowedFd<'_>,
) -> std::io::Result<()> {
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // The fds are non-negative (they are open), so they fit the kernel's u32 fields.
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = new.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_2.old_prog_fd = expected.as_raw_fd() as u32;
    attr.link_update.flags = BPF_F_REPLACE;
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link: (link type, attach type; the latter only for cgroup
/// links, else 0).
fn link_kind(link: BorrowedFd<'_>) -> std::io::Result<(u32, u32)> {
    // SAFETY: all-zero is a valid bpf_link_info and bpf_attr.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = link.as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of::<bpf_link_info>() as u32;
    attr.info.info = &mut info as *mut bpf_link_info as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let attach = if info.type_ == bpf_link_type::BPF_LINK_TYPE_CGROUP as u32 {
        // SAFETY: the kernel filled the cgroup member for a cgroup link.
        unsafe { info.__bindgen_anon_1.cgroup.attach_type }
    } else {
        0
    };
    Ok((info.type_, attach))
}

/// The id of the program `fd` refers to.
fn prog_id(fd: BorrowedFd<'_>) -> std::io::Result<u32> {
    use aya_obj::generated::bpf_prog_info;
    // SAFETY: all-zero is a valid bpf_prog_info and bpf_attr.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of::<bpf_prog_info>() as u32;
    attr.info.info = &mut info as *mut bpf_prog_info as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info.id)
}

/// An fd of the program with id `id`: from its pin `root/name` when that is the program
/// (opening a pin needs no privilege beyond the file's permissions), else by id
/// (`CAP_SYS_ADMIN`), e.g. when an earlier upgrade swapped the links but died before renaming
/// the pins.
fn prog_fd(root: &Path, name: &str, id: u32) -> std::io::Result<OwnedFd> {
    if let Ok(fd) = obj_get(&root.join(name))
        && prog_id(fd.as_fd()).is_ok_and(|got| got == id)
    {
        return Ok(fd);
    }
    prog_fd_by_id(id)
}

/// The (link type, attach type) of a link that may run `program`. The kernel checks only the
/// program type when a cgroup link's program is replaced (a connect4 program would be taken
/// for a connect6 hook), so the upgrade checks the attach type itself.
fn kind_for(program: &str) -> (u32, u32) {
    use bpf_attach_type as A;
    let cgroup = |a: A| (bpf_link_type::BPF_LINK_TYPE_CGROUP as u32, a as u32);
    match program {
        programs::CONNECT4 => cgroup(A::BPF_CGROUP_INET4_CONNECT),
        programs::CONNECT6 => cgroup(A::BPF_CGROUP_INET6_CONNECT),
        programs::SENDMSG4 => cgroup(A::BPF_CGROUP_UDP4_SENDMSG),
        programs::SENDMSG6 => cgroup(A::BPF_CGROUP_UDP6_SENDMSG),
        programs::CONNTRACK => cgroup(A::BPF_CGROUP_INET_EGRESS),
        _ => (bpf_link_type::BPF_LINK_TYPE_XDP as u32, 0),
    }
}

/// One link to swap: its pin, the program name its new program has, its fd, and the old
/// program's fd (the one it runs now).
struct Swap {
    pin: PathBuf,
    program: &'static str,
    link: OwnedFd,
    old: OwnedFd,
    link_id: u32,
    old_program_id: u32,
}

/// Every pinned link under `root`, with the program (by name) it must run after the upgrade.
fn planned_swaps(root: &Path) -> Result<Vec<Swap>, Error> {
    let mut links: Vec<(PathBuf, &'static str)> =
        attachments(root)?.into_iter().map(|a| (a.pin, programs::INGRESS)).collect();
    links.extend(crate::cgroup::pinned_cgroup_links(root).into_iter().map(|(n, p)| (p, n)));
    links
        .into_iter()
        .map(|(pin, program)| {
            let (link_id, old_program_id) = crate::cgroup::link_info(&pin)?;
            let link = obj_get(&pin)?;
            let old = prog_fd(root, program, old_program_id).map_err(io(&pin))?;
            Ok(Swap { pin, program, link, old, link_id, old_program_id })
        })
        .collect()
}

impl Dataplane {
    /// Makes the data plane pinned under `root` run this build's programs, holding
    /// `desired`, without a moment unfiltered (see the module docs). When the pinned ABI is
    /// already this build's, the pins are adopted as they are and `None` is returned (the
    /// caller then applies as usual); otherwise the returned data plane is the new one, pinned
    /// in place of the old, with both generations holding `desired`.
    ///
    /// The intended use: `match Dataplane::open_pinned(..) { Err(Error::AbiMismatch { .. }) =>
    /// Dataplane::upgrade_pinned(..), .. }`.
    pub fn upgrade_pinned(
        root: &Path,
        caps: &Capacities,
        desired: &Desired<'_>,
    ) -> Result<(Self, Option<Upgrade>), Error> {
        let _lock = lock_root(root, false)?;
        Self::upgrade_locked(root, caps, desired)
    }

    /// [`Dataplane::upgrade_pinned`] for a caller that holds the root's lock.
    pub(crate) fn upgrade_locked(
        root: &Path,
        caps: &Capacities,
        desired: &Desired<'_>,
    ) -> Result<(Self, Option<Upgrade>), Error> {
        let old_record = Pins::open(root)?;
        let meta = old_record.read(META)?.ok_or(Error::Record("no metadata entry"))?;
        let from_abi = meta.get("abi").cloned().unwrap_or_default();
        let to_abi = abi_version();
        if from_abi == to_abi {
            return Ok((Self::adopt_locked(root)?, None));
        }

        // 2. Load and fill; nothing pinned or attached changes yet.
        let mut new = Self::load(caps)?;
        let apply = new.apply_with_workloads(
            desired.encoded,
            desired.workloads,
            desired.revision,
            desired.digest,
            desired.saved_state,
        )?;
        // Pinned next, then swapped under the links.
        new.exclusive = false;

        // 3. Staged pins.
        let (mut pins, staged) = match new.pin_all_as(root, STAGED) {
            Ok(p) => p,
            Err(e) => {
                remove_staged(root);
                return Err(e);
            }
        };

        // 4 and 5. Conntrack (first pass), then the links. Up to and including the swap a
        // failure leaves the old data plane as it was.
        let same_layout = meta.get("conntrack").is_some_and(|l| *l == conntrack_layout());
        let result = (|| {
            let copied = if same_layout { new.copy_conntrack(root)? } else { 0 };
            Ok::<_, Error>((copied, new.swap_links(root)?))
        })();
        let (mut copied, links) = match result {
            Ok(r) => r,
            Err(e) => {
                remove_staged(root);
                return Err(e);
            }
        };
        // From here on the links run the new programs. The second pass is best effort (an
        // entry it misses is only a reply judged by the policy); a failure of the steps below
        // leaves the old pins and record in place, so the record still names the old ABI and
        // running the upgrade again finishes it (it swaps the links from whatever they run).
        if same_layout {
            copied += new.copy_conntrack(root).unwrap_or(0);
        }
        let conntrack = if same_layout {
            ConntrackMigration::Copied(copied)
        } else {
            ConntrackMigration::Dropped {
                pinned: meta.get("conntrack").cloned(),
                embedded: conntrack_layout(),
            }
        };

        // 6. The record of what each generation holds (the saved-state maps are replaced in
        // place, each by a rename), the metadata the old record had besides the layouts, then
        // the renames, the record last.
        let len = desired.saved_state.len().to_string();
        let state = write_id()?;
        pins.write_state(&state, desired.saved_state)?;
        for g in 0..GENERATIONS {
            // A fresh write id: no process has this generation cached, so the next apply
            // reads it from the kernel once.
            let write = write_id()?;
            pins.write(
                g,
                &[
                    ("revision", desired.revision),
                    ("digest", desired.digest),
                    ("state_len", &len),
                    ("state", &state),
                    ("write", &write),
                ],
            )?;
        }
        let layout = conntrack_layout();
        let mut fields: Vec<(&str, &str)> = vec![("abi", &to_abi), ("conntrack", &layout)];
        fields.extend(
            meta.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "abi" | "conntrack"))
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        pins.write(META, &fields)?;
        for (tmp, dst) in &staged {
            fs::rename(tmp, dst).map_err(io(dst))?;
        }
        let keep: Vec<&PathBuf> = staged.iter().map(|(_, dst)| dst).collect();
        remove_stale(root, &keep)?;
        pins.remove_unreferenced_states()?;
        new.pins = Some(pins);
        Ok((new, Some(Upgrade { from_abi, to_abi, links, conntrack, apply })))
    }

    /// Copies the pinned (old) conntrack table's entries into this data plane's table, only
    /// keys it lacks; returns how many were copied.
    fn copy_conntrack(&mut self, root: &Path) -> Result<usize, Error> {
        let name = maps::CONNTRACK;
        let old: HashMap<MapData, ConntrackKey, ConntrackValue> =
            HashMap::try_from(open_pinned_map(root, name)?).map_err(Error::map(name))?;
        // Every old entry's seen-filter slot before the entries themselves (see
        // `fw_common::conntrack`): the new program skips the table where its filter is clear,
        // and the old program's filter (if it had one) is not this one.
        // An entry can be evicted or expire while the table is walked: skip what vanished.
        let entries: Vec<(ConntrackKey, ConntrackValue)> =
            old.iter().filter_map(Result::ok).collect();
        self.conntrack_mark_seen(&entries)?;
        let map =
            self.ebpf.as_mut().and_then(|e| e.map_mut(name)).ok_or(Error::MissingMap(name))?;
        let mut table: HashMap<_, ConntrackKey, ConntrackValue> =
            HashMap::try_from(map).map_err(Error::map(name))?;
        let mut copied = 0;
        for (k, v) in entries {
            if table.get(&k, 0).is_ok() {
                continue;
            }
            table.insert(k, v, 0).map_err(Error::map(name))?;
            copied += 1;
        }
        Ok(copied)
    }

    /// Swaps every pinned link's program for this data plane's program of the same name
    /// (`BPF_LINK_UPDATE`, see the module docs); on a failure swaps back what was done.
    fn swap_links(&self, root: &Path) -> Result<Vec<SwappedLink>, Error> {
        let plan = planned_swaps(root)?;
        let ebpf = self.ebpf.as_ref().ok_or(Error::MissingProgram(programs::INGRESS))?;
        let mut done: Vec<(&Swap, SwappedLink)> = Vec::new();
        let mut failure = None;
        for swap in &plan {
            let name = swap.program;
            let program = match ebpf.program(name).ok_or(Error::MissingProgram(name)) {
                Ok(p) => p,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            let new_fd = match program.fd() {
                Ok(fd) => fd,
                Err(e) => {
                    failure = Some(Error::program(name)(e));
                    break;
                }
            };
            let new_id = match program.info() {
                Ok(i) => i.id(),
                Err(e) => {
                    failure = Some(Error::program(name)(e));
                    break;
                }
            };
            // Checked link by link, right before each swap: a mismatch is a pin that does not
            // hold what its name says (not made by this loader), and swapping the links done so
            // far back is harmless, each swap being atomic.
            match link_kind(swap.link.as_fd()) {
                Ok(kind) if kind == kind_for(name) => {}
                Ok(_) => {
                    failure = Some(Error::LinkMismatch { path: swap.pin.clone(), program: name });
                    break;
                }
                Err(source) => {
                    failure = Some(Error::LinkUpdate { path: swap.pin.clone(), source });
                    break;
                }
            }
            if let Err(source) = link_update(swap.link.as_fd(), new_fd.as_fd(), swap.old.as_fd()) {
                failure = Some(Error::LinkUpdate { path: swap.pin.clone(), source });
                break;
            }
            done.push((
                swap,
                SwappedLink {
                    pin: swap.pin.clone(),
                    program: name,
                    link_id: swap.link_id,
                    old_program_id: swap.old_program_id,
                    new_program_id: new_id,
                },
            ));
        }
        let Some(e) = failure else {
            return Ok(done.into_iter().map(|(_, s)| s).collect());
        };
        // Back to the old programs, newest first. A swap back can only fail if someone else
        // changed the link meanwhile, which the root's lock rules out for our own processes.
        for (swap, _) in done.iter().rev() {
            if let Some(Ok(new_fd)) = ebpf.program(swap.program).map(|p| p.fd()) {
                let _ = link_update(swap.link.as_fd(), swap.old.as_fd(), new_fd.as_fd());
            }
        }
        Err(e)
    }
}

/// Removes the staged pins of an upgrade that did not finish.
fn remove_staged(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().ends_with(STAGED) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Removes the pins directly under `root` that the new data plane does not have (maps or
/// programs of the old object only), except the links folder and the saved-state maps.
fn remove_stale(root: &Path, keep: &[&PathBuf]) -> Result<(), Error> {
    for entry in fs::read_dir(root).map_err(io(root))? {
        let entry = entry.map_err(io(root))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // Saved states go by what the new record names (`remove_unreferenced_states`).
        if name == LINKS || name.starts_with("FW_STATE_") || keep.contains(&&path) {
            continue;
        }
        fs::remove_file(&path).map_err(io(&path))?;
    }
    Ok(())
}

impl Pins {
    /// Opens the record pinned under `root`.
    pub(crate) fn open(root: &Path) -> Result<Pins, Error> {
        if !root.join(RECORD).exists() {
            return Err(Error::NotPinned(root.to_path_buf()));
        }
        let record = aya::maps::Array::try_from(open_pinned_map(root, RECORD)?)
            .map_err(Error::map(RECORD))?;
        Ok(Pins { root: root.to_path_buf(), record })
    }
}
