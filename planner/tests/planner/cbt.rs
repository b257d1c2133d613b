//! CBT parsers: captured and hand-written samples, and every error.

use ferry_planner::{parse_cbt, parse_cbt_with_format, CbtFormat, ChangeMap, Extent, PlanError};

const MIB: u64 = 1024 * 1024;
const DISK: u64 = 4 * MIB;

fn map(extents: &[(u64, u64)]) -> ChangeMap {
    ChangeMap::from_extents(extents.iter().map(|&(o, l)| Extent::new(o, l)))
}

fn parse(json: &str) -> Result<ChangeMap, PlanError> {
    parse_cbt("t.json", json.as_bytes(), DISK)
}

/// What the 4 MiB fixtures describe.
fn fixture_changes() -> ChangeMap {
    map(&[(0, 65536), (MIB, 196608), (3 * MIB, 65536)])
}

#[test]
fn nbdinfo_dirty_bitmap_fixture() {
    let content = include_bytes!("../data/nbdinfo-dirty-bitmap-4MiB.json");
    let (m, format) = parse_cbt_with_format("f.json", content, DISK).unwrap();
    assert_eq!(format, CbtFormat::NbdinfoMap);
    assert_eq!(m, fixture_changes());
    assert_eq!(m.chunks(65536, DISK).iter().collect::<Vec<_>>(), vec![0, 16, 17, 18, 48]);
}

#[test]
fn nbdinfo_fixture_with_partial_last_chunk() {
    let content = include_bytes!("../data/nbdinfo-dirty-bitmap-3MiB-plus-512.json");
    let disk = 3 * MIB + 512;
    let m = parse_cbt("g.json", content, disk).unwrap();
    assert_eq!(m, map(&[(131072, 65536), (3 * MIB, 512)]));
    let chunks = m.chunks(1 << 20, disk);
    assert_eq!(chunks.iter().collect::<Vec<_>>(), vec![0, 3]);
    assert_eq!(chunks.bytes(1 << 20, disk), MIB + 512);
}

#[test]
fn nbdinfo_map_of_another_size_is_rejected() {
    let content = include_bytes!("../data/nbdinfo-dirty-bitmap-4MiB.json");
    for disk in [DISK - 512, DISK + 512] {
        let err = parse_cbt("f.json", content, disk).unwrap_err();
        assert_eq!(
            err,
            PlanError::DiskSizeMismatch { label: "f.json".into(), entry: 5, map_size: DISK, disk_size: disk }
        );
    }
}

#[test]
fn nbdinfo_base_allocation_reads_bit0_as_changed() {
    // Documented: bit 0 of base:allocation is "hole"; the planner does not know the context.
    let content = include_bytes!("../data/nbdinfo-base-allocation-4MiB.json");
    let m = parse_cbt("a.json", content, DISK).unwrap();
    assert_eq!(m, map(&[(65536, MIB - 65536), (1245184, 1900544), (3211264, 983040)]));
}

#[test]
fn nbdinfo_gap_and_overlap() {
    let gap = r#"[{"offset":0,"length":10,"type":1},{"offset":20,"length":10,"type":0}]"#;
    assert_eq!(
        parse(gap).unwrap_err(),
        PlanError::NotContiguous { label: "t.json".into(), entry: 1, offset: 20, expected: 10 }
    );
    let overlap = r#"[{"offset":0,"length":10,"type":1},{"offset":5,"length":10,"type":0}]"#;
    assert_eq!(
        parse(overlap).unwrap_err(),
        PlanError::OverlappingExtents {
            label: "t.json".into(),
            entry: 1,
            offset: 5,
            length: 10,
            other: 0,
            other_offset: 0,
            other_length: 10
        }
    );
    let not_from_zero = r#"[{"offset":512,"length":10,"type":1}]"#;
    assert!(matches!(parse(not_from_zero), Err(PlanError::NotContiguous { entry: 0, expected: 0, .. })));
    let missing_type = format!(r#"[{{"offset":0,"length":{DISK},"type":1}},{{"offset":{DISK},"length":0}}]"#);
    assert_eq!(
        parse(&missing_type).unwrap_err(),
        PlanError::MissingField { label: "t.json".into(), entry: 1, field: "$[1].type".into() }
    );
}

#[test]
fn vmware_pyvmomi_sample() {
    let content = include_bytes!("../data/vmware-pyvmomi.json");
    let (m, format) = parse_cbt_with_format("vm.json", content, DISK).unwrap();
    assert_eq!(format, CbtFormat::VmwareChangedAreas);
    assert_eq!(m, fixture_changes());
}

#[test]
fn vmware_govc_paged_sample_is_unioned() {
    let content = include_bytes!("../data/vmware-govc-paged.json");
    let (m, format) = parse_cbt_with_format("vm.json", content, DISK).unwrap();
    assert_eq!(format, CbtFormat::VmwareChangedAreas);
    assert_eq!(m, fixture_changes());
}

#[test]
fn vmware_query_range_beyond_disk_is_another_disk() {
    let content = include_bytes!("../data/vmware-pyvmomi.json");
    assert_eq!(
        parse_cbt("vm.json", content, DISK - 1).unwrap_err(),
        PlanError::DiskSizeMismatch { label: "vm.json".into(), entry: 0, map_size: DISK, disk_size: DISK - 1 }
    );
    // A query over part of a larger disk is fine.
    assert_eq!(parse_cbt("vm.json", content, 2 * DISK).unwrap(), fixture_changes());
    let paged = include_bytes!("../data/vmware-govc-paged.json");
    assert!(matches!(
        parse_cbt("vm.json", paged, 3 * MIB),
        Err(PlanError::DiskSizeMismatch { entry: 1, map_size: 4194304, .. })
    ));
}

#[test]
fn vmware_errors() {
    let outside = r#"{"startOffset":1024,"length":1024,"changedArea":[{"start":0,"length":512}]}"#;
    assert_eq!(
        parse(outside).unwrap_err(),
        PlanError::ExtentOutsideQuery {
            label: "t.json".into(),
            entry: 0,
            offset: 0,
            length: 512,
            start: 1024,
            end: 2048
        }
    );
    let overlap =
        r#"{"startOffset":0,"length":4096,"changedArea":[{"start":0,"length":1024},{"start":512,"length":512}]}"#;
    assert!(matches!(parse(overlap), Err(PlanError::OverlappingExtents { entry: 1, other: 0, .. })));
    let adjacent =
        r#"{"startOffset":0,"length":4096,"changedArea":[{"start":0,"length":1024},{"start":1024,"length":512}]}"#;
    assert_eq!(parse(adjacent).unwrap(), map(&[(0, 1536)]));
    let missing = r#"{"length":4096,"changedArea":[]}"#;
    assert_eq!(
        parse(missing).unwrap_err(),
        PlanError::MissingField { label: "t.json".into(), entry: 0, field: "$.startOffset".into() }
    );
    let missing_len = r#"{"startOffset":0,"length":4096,"changedArea":[{"start":0}]}"#;
    assert_eq!(
        parse(missing_len).unwrap_err(),
        PlanError::MissingField { label: "t.json".into(), entry: 0, field: "$.changedArea[0].length".into() }
    );
    let not_object = r#"{"startOffset":0,"length":4096,"changedArea":[{"start":0,"length":1},7]}"#;
    assert_eq!(
        parse(not_object).unwrap_err(),
        PlanError::WrongType {
            label: "t.json".into(),
            entry: 1,
            field: "$.changedArea[1]".into(),
            expected: "an object",
            found: "a number"
        }
    );
    let bad_page = r#"[{"startOffset":0,"length":4096,"changedArea":[]}, "x"]"#;
    assert!(matches!(parse(bad_page), Err(PlanError::WrongType { entry: 1, expected: "an object", .. })));
    let nothing_changed = r#"{"startOffset":0,"length":4096,"changedArea":null}"#;
    assert!(parse(nothing_changed).unwrap().is_empty());
}

#[test]
fn generic_list_bare_and_wrapped() {
    let bare = r#"[{"offset": 1048576, "length": 196608}, {"offset": 0, "length": 65536}, {"offset": 3145728, "length": 65536}]"#;
    let (m, format) = parse_cbt_with_format("t.json", bare.as_bytes(), DISK).unwrap();
    assert_eq!(format, CbtFormat::ExtentList);
    assert_eq!(m, fixture_changes());
    let wrapped = format!(r#"{{"disk_size": {DISK}, "extents": {bare}}}"#);
    assert_eq!(parse(&wrapped).unwrap(), fixture_changes());
    let no_size = format!(r#"{{"extents": {bare}}}"#);
    assert_eq!(parse(&no_size).unwrap(), fixture_changes());
    let (empty, format) = parse_cbt_with_format("t.json", b" [ ] ", DISK).unwrap();
    assert!(empty.is_empty());
    assert_eq!(format, CbtFormat::EmptyList);
}

#[test]
fn generic_list_errors() {
    let other_size = r#"{"disk_size": 1000, "extents": []}"#;
    assert_eq!(
        parse(other_size).unwrap_err(),
        PlanError::DiskSizeMismatch { label: "t.json".into(), entry: 0, map_size: 1000, disk_size: DISK }
    );
    let beyond = format!(r#"[{{"offset":0,"length":1}},{{"offset":{},"length":2}}]"#, DISK - 1);
    assert_eq!(
        parse(&beyond).unwrap_err(),
        PlanError::ExtentBeyondDisk { label: "t.json".into(), entry: 1, offset: DISK - 1, length: 2, disk_size: DISK }
    );
    // Overlap is found whatever the order, and reported on the later entry.
    let overlap = r#"[{"offset":100,"length":50},{"offset":0,"length":10},{"offset":0,"length":200}]"#;
    assert_eq!(
        parse(overlap).unwrap_err(),
        PlanError::OverlappingExtents {
            label: "t.json".into(),
            entry: 2,
            offset: 0,
            length: 200,
            other: 1,
            other_offset: 0,
            other_length: 10
        }
    );
    let adjacent = r#"[{"offset":10,"length":10},{"offset":0,"length":10}]"#;
    assert_eq!(parse(adjacent).unwrap(), map(&[(0, 20)]));
    let extents_not_array = r#"{"extents": 5}"#;
    assert_eq!(
        parse(extents_not_array).unwrap_err().to_string(),
        "t.json: entry 0: $.extents must be an array, found a number"
    );
}

#[test]
fn zero_length_extents_are_ignored_but_checked() {
    let zero = r#"[{"offset":100,"length":0},{"offset":0,"length":200}]"#;
    assert_eq!(parse(zero).unwrap(), map(&[(0, 200)]));
    let zero_beyond = format!(r#"[{{"offset":{},"length":0}}]"#, DISK + 1);
    assert!(matches!(parse(&zero_beyond), Err(PlanError::ExtentBeyondDisk { entry: 0, .. })));
    let zero_at_end = format!(r#"[{{"offset":{DISK},"length":0}}]"#);
    assert!(parse(&zero_at_end).unwrap().is_empty());
    let nbd = format!(r#"[{{"offset":0,"length":0,"type":1}},{{"offset":0,"length":{DISK},"type":0}}]"#);
    assert!(parse(&nbd).unwrap().is_empty());
}

#[test]
fn numbers_must_be_non_negative_u64() {
    let negative = r#"[{"offset":-5,"length":1}]"#;
    assert_eq!(
        parse(negative).unwrap_err(),
        PlanError::NegativeNumber { label: "t.json".into(), entry: 0, field: "$[0].offset".into(), value: "-5".into() }
    );
    let negative_float = r#"[{"offset":0,"length":-1.5}]"#;
    assert!(matches!(parse(negative_float), Err(PlanError::NegativeNumber { .. })));
    let too_large = r#"[{"offset":0,"length":18446744073709551616}]"#;
    assert_eq!(
        parse(too_large).unwrap_err(),
        PlanError::NumberTooLarge {
            label: "t.json".into(),
            entry: 0,
            field: "$[0].length".into(),
            value: "1.8446744073709552e+19".into()
        }
    );
    let huge = r#"{"startOffset":0,"length":1e300,"changedArea":[]}"#;
    assert!(matches!(parse(huge), Err(PlanError::NumberTooLarge { .. })));
    let fraction = r#"[{"offset":0.5,"length":1}]"#;
    assert!(matches!(parse(fraction), Err(PlanError::InvalidNumber { .. })));
    let string = r#"[{"offset":"0","length":1}]"#;
    assert_eq!(
        parse(string).unwrap_err(),
        PlanError::InvalidNumber {
            label: "t.json".into(),
            entry: 0,
            field: "$[0].offset".into(),
            found: "\"0\"".into()
        }
    );
    let overflow = r#"[{"offset":18446744073709551615,"length":1}]"#;
    assert_eq!(
        parse_cbt("t.json", overflow.as_bytes(), u64::MAX).unwrap_err(),
        PlanError::ExtentOverflow { label: "t.json".into(), entry: 0, offset: u64::MAX, length: 1 }
    );
    let max = r#"[{"offset":18446744073709551614,"length":1}]"#;
    assert_eq!(parse_cbt("t.json", max.as_bytes(), u64::MAX).unwrap(), map(&[(u64::MAX - 1, 1)]));
}

#[test]
fn not_json_truncated_and_empty() {
    let err = parse("[{\"offset\": 0,\n \"length\": x}]").unwrap_err();
    let PlanError::NotJson { label, line, column, message } = &err else { panic!("{err:?}") };
    assert_eq!((label.as_str(), *line, *column), ("t.json", 2, 12));
    assert!(message.contains("expected value"), "{message}");
    assert!(err.to_string().starts_with("t.json: not JSON at line 2, column 12"), "{err}");

    let content = include_bytes!("../data/nbdinfo-dirty-bitmap-4MiB.json");
    let err = parse_cbt("f.json", &content[..content.len() / 2], DISK).unwrap_err();
    assert_eq!(err, PlanError::TruncatedJson { label: "f.json".into(), line: 5, column: 4 });

    assert_eq!(parse(" \n").unwrap_err(), PlanError::Empty { label: "t.json".into() });
    assert!(matches!(parse("[1, 2] x"), Err(PlanError::NotJson { .. })));
}

#[test]
fn unrecognised_formats_list_the_accepted_ones() {
    for (json, found) in [
        (r#"{"foo": 1}"#, "an object with keys [foo]"),
        ("42", "a number"),
        ("[1, 2]", "array whose first element is a number"),
        (r#"[{"start": 0}]"#, "array whose first element is an object with keys [start]"),
    ] {
        let err = parse(json).unwrap_err();
        assert_eq!(err, PlanError::UnrecognisedFormat { label: "t.json".into(), found: found.into() });
        let text = err.to_string();
        assert!(text.contains("VMware QueryChangedDiskAreas") && text.contains("nbdinfo --map --json"), "{text}");
    }
}

#[test]
fn error_messages_name_label_entry_and_values() {
    let err = parse(r#"[{"offset":0,"length":10},{"offset":5,"length":1}]"#).unwrap_err();
    assert_eq!(err.to_string(), "t.json: entry 1 (offset 5, length 1) overlaps entry 0 (offset 0, length 10)");
    let err = parse_cbt("disk0.cbt", br#"{"disk_size": 1, "extents": []}"#, 2).unwrap_err();
    assert_eq!(
        err.to_string(),
        "disk0.cbt: entry 0: map made for a disk of another size (it covers 1 bytes, this disk has 2)"
    );
}

mod properties {
    use ferry_planner::{parse_cbt, ChangeMap, Extent};
    use proptest::prelude::*;

    fn change_map() -> impl Strategy<Value = (ChangeMap, u64)> {
        (prop::collection::vec((0..10_000u64, 1..500u64), 0..30), 0..2000u64).prop_map(|(v, slack)| {
            let map = ChangeMap::from_extents(v.into_iter().map(|(o, l)| Extent::new(o, l)));
            let disk = map.extents().last().map_or(0, Extent::end) + slack;
            (map, disk)
        })
    }

    /// The map as nbdinfo prints a dirty bitmap: contiguous dirty and clean runs.
    fn nbdinfo_json(map: &ChangeMap, disk: u64) -> String {
        let mut runs = Vec::new();
        let mut at = 0;
        for e in map.extents() {
            if e.offset > at {
                runs.push(format!(
                    r#"{{ "offset": {at}, "length": {}, "type": 0, "description": "clean"}}"#,
                    e.offset - at
                ));
            }
            runs.push(format!(
                r#"{{ "offset": {}, "length": {}, "type": 1, "description": "dirty"}}"#,
                e.offset, e.len
            ));
            at = e.end();
        }
        if disk > at {
            runs.push(format!(r#"{{ "offset": {at}, "length": {}, "type": 0, "description": "clean"}}"#, disk - at));
        }
        format!("[\n{}\n]\n", runs.join(",\n"))
    }

    proptest! {
        #[test]
        fn every_format_round_trips((map, disk) in change_map(), reverse in any::<bool>()) {
            let mut list: Vec<String> =
                map.extents().iter().map(|e| format!(r#"{{"offset": {}, "length": {}}}"#, e.offset, e.len)).collect();
            if reverse {
                list.reverse();
            }
            let generic = format!("[{}]", list.join(","));
            prop_assert_eq!(&parse_cbt("p", generic.as_bytes(), disk).unwrap(), &map);
            let wrapped = format!(r#"{{"disk_size": {disk}, "extents": {generic}}}"#);
            prop_assert_eq!(&parse_cbt("p", wrapped.as_bytes(), disk).unwrap(), &map);
            let areas: Vec<String> =
                map.extents().iter().map(|e| format!(r#"{{"start": {}, "length": {}}}"#, e.offset, e.len)).collect();
            let vmware = format!(r#"{{"startOffset": 0, "length": {disk}, "changedArea": [{}]}}"#, areas.join(","));
            prop_assert_eq!(&parse_cbt("p", vmware.as_bytes(), disk).unwrap(), &map);
            prop_assert_eq!(&parse_cbt("p", nbdinfo_json(&map, disk).as_bytes(), disk).unwrap(), &map);
        }

        #[test]
        fn parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200), disk in any::<u64>()) {
            let _ = parse_cbt("p", &bytes, disk);
        }

        #[test]
        fn parse_never_panics_on_json_shapes(
            json in prop::sample::select(vec![
                r#"[{"offset": N, "length": M}]"#,
                r#"[{"offset": N, "length": M, "type": 1}]"#,
                r#"{"startOffset": N, "length": M, "changedArea": [{"start": N, "length": M}]}"#,
                r#"{"disk_size": N, "extents": [{"offset": M, "length": N}]}"#,
            ]),
            n in prop::sample::select(vec!["0", "-1", "1.5", "1e400", "18446744073709551615", "\"x\"", "null", "[]", "{}"]),
            m in prop::sample::select(vec!["0", "7", "-0", "18446744073709551616", "true", "4096"]),
            disk in prop::sample::select(vec![0u64, 4096, u64::MAX]),
        ) {
            let text = json.replace('N', n).replace('M', m);
            let _ = parse_cbt("p", text.as_bytes(), disk);
        }
    }
}
