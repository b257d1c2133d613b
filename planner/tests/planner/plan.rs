//! The per-disk plan: a table of cases over what the job was given and what the target answered.

use ferry_planner::{
    check_samples, expected_changes, plan_disk, ChangeMap, ChunkSet, Digest, DiskInputs, DiskPlan, Extent, PlanMode,
    PlanNote, TargetDisk,
};

const CS: u32 = 64 * 1024;
const C: u64 = CS as u64;

fn set(r: &[(u64, u64)]) -> ChunkSet {
    ChunkSet::from_ranges(r.iter().map(|&(a, b)| a..b))
}

fn target(existed: bool, previous_size: u64, next_chunk: u64) -> TargetDisk {
    TargetDisk { existed, previous_size, next_chunk }
}

fn inputs<'a>(
    size: u64,
    requested: Option<PlanMode>,
    map: Option<&'a ChangeMap>,
    target: TargetDisk,
    verify_samples: usize,
) -> DiskInputs<'a> {
    DiskInputs {
        chunk_size: CS,
        disk_size: size,
        requested,
        change_map: map,
        target,
        plan_only: false,
        verify_samples,
        seed: 7,
    }
}

#[test]
fn plans_by_mode_target_answer_and_resume() {
    // Chunks 2 and 5..7 changed on a disk of 10 chunks.
    let map = ChangeMap::from_extents([Extent::new(2 * C + 10, 5), Extent::new(5 * C, 2 * C)]);
    let size = 10 * C;
    let had = target(true, size, 0);
    let new = target(false, 0, 0);
    let all = set(&[(0, 10)]);
    // (case, inputs, mode, wanted, todo, needs digest map, announce, notes)
    type Case<'a> = (&'a str, DiskInputs<'a>, PlanMode, ChunkSet, ChunkSet, bool, bool, Vec<PlanNote>);
    let cases: Vec<Case> = vec![
        (
            "auto, no map, new disk: full",
            inputs(size, None, None, new, 0),
            PlanMode::Full,
            all.clone(),
            all.clone(),
            false,
            false,
            vec![],
        ),
        (
            "auto, no map, existing disk: digest",
            inputs(size, None, None, had, 0),
            PlanMode::Digest,
            all.clone(),
            all.clone(),
            true,
            false,
            vec![],
        ),
        (
            "auto with a map: cbt, announced",
            inputs(size, None, Some(&map), had, 0),
            PlanMode::Cbt,
            set(&[(2, 3), (5, 7)]),
            set(&[(2, 3), (5, 7)]),
            false,
            true,
            vec![],
        ),
        (
            "cbt with samples needs the map",
            inputs(size, Some(PlanMode::Cbt), Some(&map), had, 3),
            PlanMode::Cbt,
            set(&[(2, 3), (5, 7)]),
            set(&[(2, 3), (5, 7)]),
            true,
            true,
            vec![],
        ),
        (
            "cbt, new disk: full with a notice",
            inputs(size, Some(PlanMode::Cbt), Some(&map), new, 3),
            PlanMode::Full,
            all.clone(),
            all.clone(),
            false,
            false,
            vec![PlanNote::NewDisk],
        ),
        (
            "digest, new disk: full with a notice",
            inputs(size, Some(PlanMode::Digest), None, new, 0),
            PlanMode::Full,
            all.clone(),
            all.clone(),
            false,
            false,
            vec![PlanNote::NewDisk],
        ),
        (
            "seed: every chunk against the map",
            inputs(size, Some(PlanMode::Seed), None, had, 0),
            PlanMode::Seed,
            all.clone(),
            all.clone(),
            true,
            false,
            vec![],
        ),
        (
            "full asked on an existing disk",
            inputs(size, Some(PlanMode::Full), Some(&map), had, 3),
            PlanMode::Full,
            all.clone(),
            all.clone(),
            false,
            false,
            vec![],
        ),
        (
            "cbt, disk grew from 7.5 chunks: chunks 7.. added",
            inputs(size, None, Some(&map), target(true, 7 * C + C / 2, 0), 0),
            PlanMode::Cbt,
            set(&[(2, 3), (5, 10)]),
            set(&[(2, 3), (5, 10)]),
            false,
            true,
            vec![],
        ),
        (
            "cbt, disk shrank: nothing added",
            inputs(size, None, Some(&map), target(true, 12 * C, 0), 0),
            PlanMode::Cbt,
            set(&[(2, 3), (5, 7)]),
            set(&[(2, 3), (5, 7)]),
            false,
            true,
            vec![],
        ),
        (
            "cbt resumed at chunk 6",
            inputs(size, None, Some(&map), target(true, size, 6), 0),
            PlanMode::Cbt,
            set(&[(2, 3), (5, 7)]),
            set(&[(6, 7)]),
            false,
            true,
            vec![],
        ),
        (
            "digest resumed at chunk 4",
            inputs(size, None, None, target(true, size, 4), 0),
            PlanMode::Digest,
            all.clone(),
            set(&[(4, 10)]),
            true,
            false,
            vec![],
        ),
    ];
    for (case, inputs, mode, wanted, todo, needs_map, announce, notes) in cases {
        let p = plan_disk(&inputs);
        assert_eq!(
            (p.mode, &p.wanted, &p.todo, p.needs_digest_map, p.announce, &p.notes),
            (mode, &wanted, &todo, needs_map, announce, &notes),
            "{case}"
        );
        assert_eq!(p.chunk_count, 10, "{case}");
        assert_eq!(p.chunks_resumed(), wanted.count() - todo.count(), "{case}");
        assert_eq!(p.compares_digests(), matches!(mode, PlanMode::Digest | PlanMode::Seed), "{case}");
        // Samples only in cbt mode with verification, never among the changed chunks.
        assert_eq!(!p.samples.is_empty(), mode == PlanMode::Cbt && inputs.verify_samples > 0, "{case}");
        assert!(p.samples.iter().all(|&c| !p.wanted.contains(c)), "{case}");
    }
}

#[test]
fn a_plan_only_announces_nothing() {
    let map = ChangeMap::from_extents([Extent::new(0, C)]);
    let mut i = inputs(4 * C, None, Some(&map), target(true, 4 * C, 0), 0);
    assert!(plan_disk(&i).announce);
    i.plan_only = true;
    assert!(!plan_disk(&i).announce);
}

#[test]
fn a_sample_that_differs_falls_back_to_digest_mode_over_every_chunk() {
    let map = ChangeMap::from_extents([Extent::new(2 * C, C)]);
    let plan = plan_disk(&inputs(10 * C, None, Some(&map), target(true, 10 * C, 3), 100));
    assert_eq!(plan.samples, [0, 1, 3, 4, 5, 6, 7, 8, 9]);
    let target: Vec<Digest> = (0..10u8).map(|i| [i; 32]).collect();
    let sampled: Vec<Digest> = plan.samples.iter().map(|&c| target[c as usize]).collect();
    let target = ferry_planner::DigestMap::from_digests(C as u32, 10 * C, target).unwrap();
    // Every sample matches: the plan stands.
    assert_eq!(check_samples(plan.clone(), &sampled, &target), plan);
    // Chunk 5 differs: digest mode, every chunk from the resume point, nothing announced.
    let mut bad = sampled.clone();
    bad[4] = [0xff; 32];
    bad[6] = [0xff; 32];
    let p: DiskPlan = check_samples(plan, &bad, &target);
    assert_eq!((p.mode, p.announce, p.needs_digest_map), (PlanMode::Digest, false, true));
    assert_eq!((p.wanted.clone(), p.todo.clone()), (set(&[(0, 10)]), set(&[(3, 10)])));
    assert_eq!(p.notes, [PlanNote::CbtMissedChange { chunk: 5 }]);
    assert!(p.notes[0].is_warning());
    assert_eq!(
        p.notes[0].message("sda"),
        "disk \"sda\": changed block tracking missed a change (chunk 5 differs from the replica but is not in \
         the change list); replicating this disk in digest mode"
    );
    assert_eq!(PlanNote::NewDisk.message("sda"), "disk \"sda\" is new to the replica: copying it in full");
}

#[test]
fn expected_changes_come_from_the_map_in_cbt_or_auto_after_the_first_run() {
    let map = ChangeMap::from_extents([Extent::new(C, 1)]);
    let one = Some(set(&[(1, 2)]));
    assert_eq!(expected_changes(None, Some(&map), CS, 4 * C, false), one);
    assert_eq!(expected_changes(Some(PlanMode::Cbt), Some(&map), CS, 4 * C, false), one);
    assert_eq!(expected_changes(None, Some(&map), CS, 4 * C, true), None, "first run: full");
    assert_eq!(expected_changes(Some(PlanMode::Digest), Some(&map), CS, 4 * C, false), None);
    assert_eq!(expected_changes(None, None, CS, 4 * C, false), None);
}

#[test]
fn modes_serialise_in_lowercase_and_match_the_wire() {
    for (m, s) in
        [(PlanMode::Full, "full"), (PlanMode::Cbt, "cbt"), (PlanMode::Digest, "digest"), (PlanMode::Seed, "seed")]
    {
        assert_eq!(serde_json::to_value(m).unwrap(), s);
        assert_eq!(m.to_string(), s);
        assert_eq!(format!("{:?}", ferry_wire::Mode::from(m)).to_lowercase(), s, "as the plan event said before");
        assert_eq!(PlanMode::from(ferry_wire::Mode::from(m)), m);
    }
}
