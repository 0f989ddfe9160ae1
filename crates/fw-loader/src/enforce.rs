//! One way to make the kernel enforce a compiled state, shared by `fwctl apply` and the daemon:
//! lock the bpffs root, open what is pinned there (or load and pin it, or upgrade it), apply,
//! attach.
//!
//! Why it is built this way:
//! - The root's lock ([`crate::lock_root`]) is taken before anything under the root is opened
//!   or read, and held until the last attachment is pinned. Opening and then locking would
//!   leave a window in which another process could unload, upgrade or apply: the handles
//!   opened before the lock would then name maps no longer pinned, or the apply would diff
//!   against a state that is no longer what the kernel holds.
//! - A root pinned by a build with another ABI is not an error here: it goes through
//!   [`Dataplane::upgrade_pinned`]'s protocol (new programs filled with the desired state, then
//!   swapped under their links), so an upgraded binary converges without a moment unfiltered.
//! - A caller that keeps its `Dataplane` (the daemon) enforces through
//!   [`Dataplane::enforce`], so what the handle knows each generation holds survives between
//!   applies and a change costs O(diff). When it also knows the change as entry deltas against
//!   the state applied last, it passes them ([`Change::Delta`]) and nothing before the flip is
//!   O(policy size); a stale base (someone else wrote the maps) falls back to a full apply.
//! - Attachments are made after the state is written (a fresh data plane drops everything
//!   until a generation holds a state) and are idempotent: an interface or cgroup already
//!   attached to this data plane's programs is left alone; interfaces no longer wanted are
//!   detached.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fw_compiler::mapstate::Capacities;

use crate::pin::{RECORD, lock_root, on_bpffs};
use crate::{
    ApplyReport, Attachment, Dataplane, Desired, EgressAttachment, Error, MapDelta, Upgrade,
};

/// Where a data plane is pinned and what it attaches to.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// The bpffs root.
    pub root: &'a Path,
    /// Capacities of the inner maps when the data plane is loaded or upgraded.
    pub caps: &'a Capacities,
    /// Interfaces the XDP ingress program attaches to; others are detached.
    pub interfaces: &'a [String],
    /// The cgroup v2 directory the egress programs attach to.
    pub cgroup: &'a Path,
}

/// How the state reaches the kernel.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    /// Diff the whole desired state against what each generation holds.
    Full,
    /// Entry deltas on top of the state applied with digest `base_digest`
    /// ([`Dataplane::apply_changes_with_workloads`]); falls back to [`Change::Full`] when the
    /// base is stale.
    Delta { base_digest: &'a str, changes: &'a BTreeMap<&'static str, MapDelta> },
}

/// How the data plane was opened.
#[derive(Clone, Debug)]
pub enum Origin {
    /// Nothing was pinned: the object was loaded and pinned.
    Loaded,
    /// The pins were adopted; no program was loaded.
    Adopted,
    /// The pins held another ABI: the programs were replaced under their links.
    Upgraded(Box<Upgrade>),
    /// The caller's own, already open data plane.
    Held,
}

/// What one enforce did.
#[derive(Clone, Debug)]
pub struct Enforced {
    pub origin: Origin,
    /// The apply (for an upgrade, the apply that filled the new maps).
    pub apply: ApplyReport,
    /// Whether the change was applied as entry deltas (false: full diff, also after a stale
    /// base).
    pub delta: bool,
    pub egress: EgressAttachment,
    /// One per wanted interface.
    pub attached: Vec<Attachment>,
    /// Pins of XDP links detached from interfaces no longer wanted.
    pub detached: Vec<PathBuf>,
}

/// Opens the data plane pinned at `target.root` (loading and pinning it on first use,
/// upgrading it when its ABI differs), applies `desired` and attaches it, all under the
/// root's lock. On an error before the flip the kernel keeps enforcing what it did.
pub fn enforce(target: &Target<'_>, desired: &Desired<'_>) -> Result<(Dataplane, Enforced), Error> {
    if !on_bpffs(target.root) {
        return Err(Error::NotBpffs(target.root.to_path_buf()));
    }
    let _lock = lock_root(target.root, true)?;
    let (mut dp, origin) = if target.root.join(RECORD).exists() {
        match Dataplane::adopt_locked(target.root) {
            Ok(dp) => (dp, Origin::Adopted),
            Err(Error::AbiMismatch { .. }) => {
                match Dataplane::upgrade_locked(target.root, target.caps, desired)? {
                    (dp, Some(up)) => (dp, Origin::Upgraded(Box::new(up))),
                    (dp, None) => (dp, Origin::Adopted),
                }
            }
            Err(e) => return Err(e),
        }
    } else {
        (Dataplane::load_pinned_locked(target.root, target.caps)?, Origin::Loaded)
    };
    let (apply, delta) = match &origin {
        // The upgrade filled both generations with `desired` already.
        Origin::Upgraded(up) => (up.apply.clone(), false),
        _ => (dp.apply_desired(desired, Change::Full)?, false),
    };
    let enforced = dp.attach_all(target, origin, apply, delta)?;
    Ok((dp, enforced))
}

impl Dataplane {
    /// [`enforce`] on this open data plane, under the root's lock: applies `desired` (as
    /// `change` says), then makes the attachments `target` names. The data plane must be
    /// pinned at `target.root`; it is not reopened, so what it knows each generation holds
    /// keeps the apply O(diff).
    pub fn enforce(
        &mut self,
        target: &Target<'_>,
        desired: &Desired<'_>,
        change: Change<'_>,
    ) -> Result<Enforced, Error> {
        if self.pin_root() != Some(target.root) {
            return Err(Error::NotPinned(target.root.to_path_buf()));
        }
        let _lock = lock_root(target.root, false)?;
        let delta = matches!(change, Change::Delta { .. });
        let (apply, delta) = match self.apply_desired(desired, change) {
            Err(Error::StaleBase) if delta => (self.apply_desired(desired, Change::Full)?, false),
            Ok(r) => (r, delta),
            Err(e) => return Err(e),
        };
        self.attach_all(target, Origin::Held, apply, delta)
    }

    fn apply_desired(&mut self, d: &Desired<'_>, change: Change<'_>) -> Result<ApplyReport, Error> {
        match change {
            Change::Full => self.apply_with_workloads(
                d.encoded,
                d.workloads,
                d.revision,
                d.digest,
                d.saved_state,
            ),
            Change::Delta { base_digest, changes } => {
                let report = self.apply_changes_with_workloads(
                    base_digest,
                    changes,
                    d.workloads,
                    d.revision,
                    d.digest,
                    d.saved_state,
                )?;
                // Both generations now hold `d.encoded` (but the workload table): their cache
                // entries keep its buffers rather than the copies the deltas were patched into.
                self.share_cached_maps(d.encoded);
                Ok(report)
            }
        }
    }

    fn attach_all(
        &mut self,
        target: &Target<'_>,
        origin: Origin,
        apply: ApplyReport,
        delta: bool,
    ) -> Result<Enforced, Error> {
        let egress = self.attach_egress_pinned(target.cgroup)?;
        let attached =
            target.interfaces.iter().map(|i| self.attach_xdp(i)).collect::<Result<Vec<_>, _>>()?;
        let detached = self.detach_xdp_except(target.interfaces)?;
        Ok(Enforced { origin, apply, delta, egress, attached, detached })
    }
}
