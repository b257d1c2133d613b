//! Plan-only sessions: what the target holds, read from the datastore; nothing is
//! locked, created, resized or written.

use std::collections::HashMap;

use ferry_wire::{DigestMapRequest, Frame, OpenDisk, OpenReplica, ReplicaOpened, ResumeInfo};

use super::digest_map::{rebuild_unknown, send_digest_map};
use super::session::TargetSession;
use super::SessionReport;
use crate::error::{MoveError, Result};
use ferry_datastore::digests::{self, DigestMap, ZeroDigests};
use ferry_datastore::image::{Placement, ReplicaImage};
use ferry_datastore::store::{self as datastore, Replica, SessionState};
use ferry_datastore::StoreError;

/// A plan-only replica session: reads the datastore, changes nothing.
pub(super) struct PlanSession {
    replica: Option<Replica>,
    session: Option<SessionState>,
    /// Disk id -> (image opened read-only, name, digest map as the disk would have it).
    /// An image behind an NBD export is connected to only when it must be hashed.
    disks: HashMap<u32, (Option<ReplicaImage>, String, DigestMap)>,
}

impl TargetSession<'_> {
    /// OpenReplica with the plan-only flag: the replica as it stands (or none yet).
    pub(super) fn open_plan_replica(&mut self, o: &OpenReplica, report: &mut SessionReport) -> Result<()> {
        datastore::validate_name("replica", &o.replica)?;
        super::policy::check_open(&self.grant, &o.replica, false)?;
        let replica = match self.ds.replica(&o.replica) {
            Ok(r) => Some(r),
            Err(StoreError::NotFound(_)) => None, // a new replica
            Err(e) => return Err(e.into()),
        };
        let session = replica.as_ref().map(|r| r.session()).transpose()?.flatten();
        let catalog = replica.as_ref().map(|r| r.catalog()).transpose()?.unwrap_or_default();
        let latest = catalog.points.last();
        self.send(Frame::ReplicaOpened(ReplicaOpened {
            session_id: o.session_id,
            resumed: session.is_some(),
            latest_point: latest.map_or(0, |p| p.id),
            latest_point_time_ns: latest.map_or(0, |p| p.point_time_ns),
            chunk_size: replica.as_ref().map_or(0, |r| r.settings.chunk_size),
            pending_point_time_ns: session.as_ref().map_or(0, |s| s.point_time_ns),
        }))?;
        report.replica = Some(o.replica.clone());
        self.plan = Some(PlanSession { replica, session, disks: HashMap::new() });
        Ok(())
    }

    /// OpenDisk in a plan-only session: what the target holds, nothing created or resized.
    pub(super) fn plan_open_disk(&mut self, o: &OpenDisk) -> Result<()> {
        datastore::validate_name("disk", &o.name)?;
        self.admit_disk(o)?;
        let plan = self.plan.as_mut().expect("plan session");
        let (image, existing, nbd) = match &plan.replica {
            Some(r) => {
                if r.settings.chunk_size != 0 && r.settings.chunk_size != o.chunk_size {
                    return Err(MoveError::Usage(format!(
                        "replica {:?} uses chunk size {} and cannot take disk {:?} with chunk size {}",
                        r.name, r.settings.chunk_size, o.name, o.chunk_size
                    )));
                }
                match Placement::of(r, &o.name)? {
                    // As open_disk sizes it; the export is connected to only if it must be hashed.
                    Placement::Nbd(_) => {
                        let catalog = r.catalog()?;
                        let point = catalog.points.last().and_then(|p| p.disks.iter().find(|d| d.name == o.name));
                        (None, point.map_or(o.size, |d| d.size), true)
                    }
                    Placement::File(_) => {
                        let f = ReplicaImage::open_ro(r, &o.name).ok().flatten();
                        let size = f.as_ref().and_then(|f| f.capacity().ok()).unwrap_or(0);
                        (f, size, false)
                    }
                }
            }
            None => (None, 0, false),
        };
        let cs = o.chunk_size;
        let chunk_count = o.size.div_ceil(u64::from(cs));
        let resume = plan.session.as_ref().and_then(|s| s.disks.get(&o.name)).filter(|d| d.size == o.size);
        let (previous_size, next_chunk) =
            resume.map_or((existing, 0), |d| (d.previous_size, d.next_chunk.min(chunk_count)));
        let zeros = ZeroDigests::new(cs);
        let stored = plan.replica.as_ref().map(|r| r.digests_path(&o.name)).transpose()?;
        let mut map = match stored.and_then(|p| digests::load(&p, cs, existing)) {
            Some(m) => Ok(m),
            None if existing == 0 && !nbd => DigestMap::zeroed(cs, existing, &zeros),
            None => DigestMap::new(cs, existing),
        }
        .map_err(|e| MoveError::Usage(e.to_string()))?;
        map.resize(o.size, |l| zeros.digest(l));
        let existed = nbd || (image.is_some() && existing > 0);
        plan.disks.insert(o.disk, (image, o.name.clone(), map));
        self.send(Frame::ResumeInfo(ResumeInfo {
            disk: o.disk,
            previous_size,
            next_chunk,
            flags: if existed { ResumeInfo::EXISTED } else { 0 },
        }))
    }

    /// DigestMapRequest in a plan-only session: the map as the disk would have it, its
    /// unknown chunks hashed (the image opened, or its export connected to, only then).
    pub(super) fn plan_digest_map(&mut self, r: &DigestMapRequest, report: &mut SessionReport) -> Result<()> {
        let no_disk = self.protocol(format!("no disk {}", r.disk));
        let plan = self.plan.as_mut().expect("checked");
        let (image, name, map) = plan.disks.get_mut(&r.disk).ok_or(no_disk)?;
        if map.unknown_count() > 0 {
            if image.is_none() {
                if let Some(r) = &plan.replica {
                    *image = ReplicaImage::open_ro(r, name)?;
                }
            }
            match image {
                Some(img) => rebuild_unknown(img, map)?,
                None => return Err(StoreError::NotFound(format!("disk {name:?} has no image to hash")).into()),
            }
        }
        let sent = send_digest_map(&self.events, r.disk, map, &r.cached_map_hash)?;
        sent.count_in(report);
        Ok(())
    }
}
