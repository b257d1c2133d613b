//! Parsers of changed-block-tracking exports (see the crate docs for the formats).

use serde_json::{Map, Value};

use crate::{ChangeMap, Extent, PlanError};

/// The change-map formats [`parse_cbt`] recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CbtFormat {
    /// VMware QueryChangedDiskAreas: one DiskChangeInfo object or an array of them.
    VmwareChangedAreas,
    /// A generic extent list, bare or wrapped with a disk size.
    ExtentList,
    /// `nbdinfo --map --json` output.
    NbdinfoMap,
    /// An empty JSON array: no changes, whatever the format.
    EmptyList,
}

/// Parses a change map and checks it against a disk of `disk_size` bytes.
///
/// `label` names the input in errors (a file name, say). The format is
/// recognised from the content; see [`parse_cbt_with_format`] to learn which.
pub fn parse_cbt(label: &str, content: &[u8], disk_size: u64) -> Result<ChangeMap, PlanError> {
    parse_cbt_with_format(label, content, disk_size).map(|(map, _)| map)
}

/// [`parse_cbt`], also returning the format recognised.
pub fn parse_cbt_with_format(label: &str, content: &[u8], disk_size: u64) -> Result<(ChangeMap, CbtFormat), PlanError> {
    let p = Parser { label, disk_size };
    if content.iter().all(u8::is_ascii_whitespace) {
        return Err(PlanError::Empty { label: label.to_owned() });
    }
    let value: Value = serde_json::from_slice(content).map_err(|e| p.json_error(&e))?;
    match &value {
        Value::Object(obj) if get(obj, "changedArea").is_some() => {
            Ok((p.vmware_page(0, "$", obj)?, CbtFormat::VmwareChangedAreas))
        }
        Value::Object(obj) if get(obj, "extents").is_some() => Ok((p.wrapped_list(obj)?, CbtFormat::ExtentList)),
        Value::Array(items) if items.is_empty() => Ok((ChangeMap::new(), CbtFormat::EmptyList)),
        Value::Array(items) => match &items[0] {
            Value::Object(first) if get(first, "changedArea").is_some() => {
                Ok((p.vmware_pages(items)?, CbtFormat::VmwareChangedAreas))
            }
            Value::Object(first) if get(first, "offset").is_some() && get(first, "type").is_some() => {
                Ok((p.nbdinfo(items)?, CbtFormat::NbdinfoMap))
            }
            Value::Object(first) if get(first, "offset").is_some() => {
                Ok((p.extent_list("$", items)?, CbtFormat::ExtentList))
            }
            other => Err(p.unrecognised(format!("array whose first element is {}", describe(other)))),
        },
        other => Err(p.unrecognised(describe(other))),
    }
}

/// Looks a key up ignoring ASCII case (govc and pyVmomi differ in case).
fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).or_else(|| obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Object(obj) => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).take(8).collect();
            format!("an object with keys [{}]", keys.join(", "))
        }
        other => type_name(other).to_owned(),
    }
}

/// One extent as read, before the checks that need its neighbours.
#[derive(Clone, Copy)]
struct Entry {
    index: usize,
    offset: u64,
    len: u64,
}

impl Entry {
    fn end(&self) -> u64 {
        // Overflow is rejected when entries are read.
        self.offset + self.len
    }
}

struct Parser<'a> {
    label: &'a str,
    disk_size: u64,
}

impl Parser<'_> {
    fn label(&self) -> String {
        self.label.to_owned()
    }

    fn json_error(&self, e: &serde_json::Error) -> PlanError {
        let (line, column) = (e.line(), e.column());
        if e.is_eof() {
            PlanError::TruncatedJson { label: self.label(), line, column }
        } else {
            // serde_json's message repeats the position: keep only the reason.
            let message = e.to_string();
            let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
            PlanError::NotJson { label: self.label(), line, column, message }
        }
    }

    fn unrecognised(&self, found: String) -> PlanError {
        PlanError::UnrecognisedFormat { label: self.label(), found }
    }

    fn object<'v>(&self, entry: usize, path: &str, v: &'v Value) -> Result<&'v Map<String, Value>, PlanError> {
        v.as_object().ok_or_else(|| self.wrong_type(entry, path, "an object", v))
    }

    fn array<'v>(&self, entry: usize, path: &str, v: &'v Value) -> Result<&'v [Value], PlanError> {
        v.as_array().map(Vec::as_slice).ok_or_else(|| self.wrong_type(entry, path, "an array", v))
    }

    fn wrong_type(&self, entry: usize, path: &str, expected: &'static str, v: &Value) -> PlanError {
        PlanError::WrongType { label: self.label(), entry, field: path.to_owned(), expected, found: type_name(v) }
    }

    /// A required non-negative integer field.
    fn u64_field(&self, entry: usize, path: &str, obj: &Map<String, Value>, key: &str) -> Result<u64, PlanError> {
        let field = format!("{path}.{key}");
        match get(obj, key) {
            None => Err(PlanError::MissingField { label: self.label(), entry, field }),
            Some(v) => self.u64_value(entry, field, v),
        }
    }

    fn u64_value(&self, entry: usize, field: String, v: &Value) -> Result<u64, PlanError> {
        let label = self.label();
        let Value::Number(n) = v else {
            return Err(PlanError::InvalidNumber { label, entry, field, found: v.to_string() });
        };
        if let Some(u) = n.as_u64() {
            return Ok(u);
        }
        let value = n.to_string();
        if n.as_i64().is_some() {
            return Err(PlanError::NegativeNumber { label, entry, field, value });
        }
        // Without serde_json's arbitrary_precision, integers beyond 64 bits arrive as floats.
        let f = n.as_f64().unwrap_or(f64::NAN);
        if f < 0.0 {
            Err(PlanError::NegativeNumber { label, entry, field, value })
        } else if f >= 18_446_744_073_709_551_616.0 {
            Err(PlanError::NumberTooLarge { label, entry, field, value })
        } else {
            Err(PlanError::InvalidNumber { label, entry, field, found: value })
        }
    }

    /// Reads `{offset_key, length_key}` and checks that the end fits in 64 bits.
    fn entry(
        &self,
        index: usize,
        path: &str,
        v: &Value,
        offset_key: &str,
        length_key: &str,
    ) -> Result<Entry, PlanError> {
        let obj = self.object(index, path, v)?;
        let offset = self.u64_field(index, path, obj, offset_key)?;
        let len = self.u64_field(index, path, obj, length_key)?;
        if offset.checked_add(len).is_none() {
            return Err(PlanError::ExtentOverflow { label: self.label(), entry: index, offset, length: len });
        }
        Ok(Entry { index, offset, len })
    }

    fn check_in_disk(&self, e: &Entry) -> Result<(), PlanError> {
        if e.end() > self.disk_size {
            return Err(PlanError::ExtentBeyondDisk {
                label: self.label(),
                entry: e.index,
                offset: e.offset,
                length: e.len,
                disk_size: self.disk_size,
            });
        }
        Ok(())
    }

    /// Rejects overlapping entries (adjacent ones are fine), in any order.
    /// Zero-length entries overlap nothing.
    fn check_no_overlap(&self, entries: &mut [Entry]) -> Result<(), PlanError> {
        entries.sort_by_key(|e| (e.offset, e.index));
        let mut widest: Option<Entry> = None;
        for e in entries.iter().filter(|e| e.len > 0) {
            if let Some(w) = widest {
                if e.offset < w.end() {
                    // Report the entry that comes later in the input.
                    let (later, earlier) = if e.index > w.index { (e, &w) } else { (&w, e) };
                    return Err(PlanError::OverlappingExtents {
                        label: self.label(),
                        entry: later.index,
                        offset: later.offset,
                        length: later.len,
                        other: earlier.index,
                        other_offset: earlier.offset,
                        other_length: earlier.len,
                    });
                }
            }
            if widest.is_none_or(|w| e.end() > w.end()) {
                widest = Some(*e);
            }
        }
        Ok(())
    }

    /// A generic list: `[{"offset": N, "length": N}, ...]`.
    fn extent_list(&self, path: &str, items: &[Value]) -> Result<ChangeMap, PlanError> {
        let mut entries = Vec::with_capacity(items.len());
        for (i, v) in items.iter().enumerate() {
            let e = self.entry(i, &format!("{path}[{i}]"), v, "offset", "length")?;
            self.check_in_disk(&e)?;
            entries.push(e);
        }
        self.check_no_overlap(&mut entries)?;
        Ok(ChangeMap::from_extents(entries.iter().map(|e| Extent::new(e.offset, e.len))))
    }

    /// `{"disk_size": N, "extents": [...]}`, disk_size optional.
    fn wrapped_list(&self, obj: &Map<String, Value>) -> Result<ChangeMap, PlanError> {
        if get(obj, "disk_size").is_some() {
            let map_size = self.u64_field(0, "$", obj, "disk_size")?;
            if map_size != self.disk_size {
                return Err(PlanError::DiskSizeMismatch {
                    label: self.label(),
                    entry: 0,
                    map_size,
                    disk_size: self.disk_size,
                });
            }
        }
        let items = self.array(0, "$.extents", get(obj, "extents").unwrap_or(&Value::Null))?;
        self.extent_list("$.extents", items)
    }

    /// An array of DiskChangeInfo pages, unioned.
    fn vmware_pages(&self, items: &[Value]) -> Result<ChangeMap, PlanError> {
        let mut map = ChangeMap::new();
        for (page, v) in items.iter().enumerate() {
            let path = format!("$[{page}]");
            let obj = self.object(page, &path, v)?;
            map = map.union(&self.vmware_page(page, &path, obj)?);
        }
        Ok(map)
    }

    /// One DiskChangeInfo.
    fn vmware_page(&self, page: usize, path: &str, obj: &Map<String, Value>) -> Result<ChangeMap, PlanError> {
        let start = self.u64_field(page, path, obj, "startOffset")?;
        let length = self.u64_field(page, path, obj, "length")?;
        let Some(end) = start.checked_add(length) else {
            return Err(PlanError::ExtentOverflow { label: self.label(), entry: page, offset: start, length });
        };
        if end > self.disk_size {
            return Err(PlanError::DiskSizeMismatch {
                label: self.label(),
                entry: page,
                map_size: end,
                disk_size: self.disk_size,
            });
        }
        let areas_path = format!("{path}.changedArea");
        let areas = match get(obj, "changedArea") {
            // pyVmomi prints an empty list; some tools print null for "nothing changed".
            Some(Value::Null) | None => &[][..],
            Some(v) => self.array(page, &areas_path, v)?,
        };
        let mut entries = Vec::with_capacity(areas.len());
        for (i, v) in areas.iter().enumerate() {
            let e = self.entry(i, &format!("{areas_path}[{i}]"), v, "start", "length")?;
            if e.offset < start || e.end() > end {
                return Err(PlanError::ExtentOutsideQuery {
                    label: self.label(),
                    entry: i,
                    offset: e.offset,
                    length: e.len,
                    start,
                    end,
                });
            }
            entries.push(e);
        }
        self.check_no_overlap(&mut entries)?;
        Ok(ChangeMap::from_extents(entries.iter().map(|e| Extent::new(e.offset, e.len))))
    }

    /// `nbdinfo --map --json`: contiguous extents from 0 to the disk size;
    /// `type & 1 != 0` is changed (dirty for a qemu:dirty-bitmap context).
    fn nbdinfo(&self, items: &[Value]) -> Result<ChangeMap, PlanError> {
        let mut map = ChangeMap::new();
        let mut expected = 0u64;
        let mut last_nonempty: Option<Entry> = None;
        for (i, v) in items.iter().enumerate() {
            let path = format!("$[{i}]");
            let e = self.entry(i, &path, v, "offset", "length")?;
            let obj = self.object(i, &path, v)?;
            let kind = self.u64_field(i, &path, obj, "type")?;
            if e.offset < expected {
                let prev = last_nonempty.unwrap_or(Entry { index: i, offset: 0, len: 0 });
                return Err(PlanError::OverlappingExtents {
                    label: self.label(),
                    entry: i,
                    offset: e.offset,
                    length: e.len,
                    other: prev.index,
                    other_offset: prev.offset,
                    other_length: prev.len,
                });
            }
            if e.offset > expected {
                return Err(PlanError::NotContiguous { label: self.label(), entry: i, offset: e.offset, expected });
            }
            expected = e.end();
            if e.len > 0 {
                last_nonempty = Some(e);
            }
            if kind & 1 != 0 {
                map.insert(Extent::new(e.offset, e.len));
            }
        }
        if expected != self.disk_size {
            return Err(PlanError::DiskSizeMismatch {
                label: self.label(),
                entry: items.len().saturating_sub(1),
                map_size: expected,
                disk_size: self.disk_size,
            });
        }
        Ok(map)
    }
}
