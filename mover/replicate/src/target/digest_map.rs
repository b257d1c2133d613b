//! Digest maps: unknown digests rebuilt by hashing the image, and a map sent as
//! DigestMapPart frames and a DigestMapEnd through the sending thread.

use crossbeam_channel::Sender;
use ferry_wire::{DigestMapEnd, DigestMapPart, Frame, MAX_DIGESTS_PER_PART};

use super::sender::Outgoing;
use super::SessionReport;
use crate::error::{MoveError, Result};
use ferry_datastore::digests::{DigestMap, ZeroDigests};
use ferry_datastore::image::ReplicaImage;

/// Hash the chunks of an image whose digests are unknown (a seed placed in
/// the datastore, an export placed behind DISK.nbd, a lost or stale map), at
/// local disk speed. Chunks an export reports as zeros are not read.
pub(super) fn rebuild_unknown(image: &ReplicaImage, map: &mut DigestMap) -> Result<()> {
    let cs = u64::from(map.chunk_size());
    let size = map.disk_size();
    if map.unknown_count() > 0 {
        let zeros = ZeroDigests::new(map.chunk_size());
        for c in image.zero_chunks(map.chunk_size(), size)? {
            if c < map.chunk_count() && !map.is_known(c) {
                map.set(c, zeros.digest(map.chunk_len(c)));
            }
        }
    }
    let mut buf = vec![0u8; map.chunk_size() as usize];
    let mut next = map.next_unknown(0);
    while let Some(i) = next {
        next = map.next_unknown(i + 1);
        let len = map.chunk_len(i) as usize;
        // Bytes past the end of a file image read as zeros (it grows sparse).
        image.read_padded(&mut buf[..len], i * cs, "hashing")?;
        map.set(i, *blake3::hash(&buf[..len]).as_bytes());
    }
    Ok(())
}

/// What answering one DigestMapRequest sent.
pub(super) struct MapSent {
    cache_hit: bool,
    parts: u64,
}

impl MapSent {
    pub(super) fn count_in(&self, report: &mut SessionReport) {
        report.digest_maps += 1;
        report.digest_map_hits += u64::from(self.cache_hit);
        report.digest_map_parts += self.parts;
    }
}

/// Send a digest map as parts and an end (or only the end when the client's cached copy is
/// current), queued for the sending thread in order. Each part is copied out of the map (as
/// the frame's payload); the channel holds a few at most.
pub(super) fn send_digest_map(
    out: &Sender<Outgoing>,
    disk: u32,
    map: &DigestMap,
    cached: &[u8; 32],
) -> Result<MapSent> {
    let gone = || MoveError::Internal("the sending thread stopped".into());
    let hash = map.map_hash();
    let cache_hit = hash == *cached;
    let mut parts = 0;
    if !cache_hit {
        let n = map.chunk_count();
        for first_chunk in (0..n).step_by(MAX_DIGESTS_PER_PART) {
            let mut digests = Vec::new();
            map.encode_range(first_chunk..(first_chunk + MAX_DIGESTS_PER_PART as u64).min(n), &mut digests);
            let part = DigestMapPart { disk, first_chunk, digests: digests.into() };
            out.send(Outgoing::Frame(Frame::DigestMapPart(part))).map_err(|_| gone())?;
            parts += 1;
        }
    }
    let end = DigestMapEnd { disk, chunk_count: map.chunk_count(), map_hash: hash, cache_hit };
    out.send(Outgoing::Frame(Frame::DigestMapEnd(end))).map_err(|_| gone())?;
    Ok(MapSent { cache_hit, parts })
}
