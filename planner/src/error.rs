//! Errors of the planner.

/// Everything the planner refuses, with where and why.
///
/// `label` is the caller's name for the input (a file name, `"stdin"`, a disk
/// name); `entry` is the index of the offending element in its list (the
/// extent, or for fields of a VMware DiskChangeInfo, the page: 0 when the
/// input is a single object); `field` is a JSON path such as
/// `$[1].changedArea[3].length`. All offsets and lengths are in bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The change map is empty (or only whitespace): an interrupted export, most likely.
    #[error("{label}: change map is empty (an interrupted export?)")]
    Empty {
        /// The caller's name for the input.
        label: String,
    },
    /// The change map is not JSON.
    #[error("{label}: not JSON at line {line}, column {column}: {message}")]
    NotJson {
        /// The caller's name for the input.
        label: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// serde_json's description.
        message: String,
    },
    /// The JSON ends before it is complete: a truncated file.
    #[error("{label}: JSON is truncated (input ends at line {line}, column {column})")]
    TruncatedJson {
        /// The caller's name for the input.
        label: String,
        /// 1-based line where the input ends.
        line: usize,
        /// Column where the input ends.
        column: usize,
    },
    /// Valid JSON, but none of the change-map formats this planner reads.
    #[error(
        "{label}: unrecognised change map format ({found}); accepted formats: VMware QueryChangedDiskAreas \
         (a DiskChangeInfo object {{\"startOffset\", \"length\", \"changedArea\": [{{\"start\", \"length\"}}]}} \
         or an array of them), a generic extent list ([{{\"offset\", \"length\"}}] or \
         {{\"disk_size\", \"extents\": [...]}}), nbdinfo --map --json output ([{{\"offset\", \"length\", \"type\", \
         \"description\"}}])"
    )]
    UnrecognisedFormat {
        /// What was found instead, e.g. `object with keys [foo, bar]`.
        found: String,
        /// The caller's name for the input.
        label: String,
    },
    /// An element has the wrong JSON type (an object or an array was expected).
    #[error("{label}: entry {entry}: {field} must be {expected}, found {found}")]
    WrongType {
        /// The caller's name for the input.
        label: String,
        /// Index of the element.
        entry: usize,
        /// JSON path of the element.
        field: String,
        /// The JSON type expected, e.g. `an object`.
        expected: &'static str,
        /// The JSON type found.
        found: &'static str,
    },
    /// A required field is missing.
    #[error("{label}: entry {entry}: missing field {field}")]
    MissingField {
        /// The caller's name for the input.
        label: String,
        /// Index of the element.
        entry: usize,
        /// JSON path of the missing field.
        field: String,
    },
    /// A field that must be a non-negative integer is another type or has a fraction or exponent.
    #[error("{label}: entry {entry}: {field} must be a non-negative integer, found {found}")]
    InvalidNumber {
        /// The caller's name for the input.
        label: String,
        /// Index of the element.
        entry: usize,
        /// JSON path of the field.
        field: String,
        /// The value found, as JSON text.
        found: String,
    },
    /// A size or offset is negative.
    #[error("{label}: entry {entry}: {field} is negative ({value})")]
    NegativeNumber {
        /// The caller's name for the input.
        label: String,
        /// Index of the element.
        entry: usize,
        /// JSON path of the field.
        field: String,
        /// The value, as JSON text.
        value: String,
    },
    /// A size or offset does not fit in 64 bits.
    #[error("{label}: entry {entry}: {field} = {value} does not fit in an unsigned 64-bit integer")]
    NumberTooLarge {
        /// The caller's name for the input.
        label: String,
        /// Index of the element.
        entry: usize,
        /// JSON path of the field.
        field: String,
        /// The value, as JSON text.
        value: String,
    },
    /// offset + length does not fit in 64 bits.
    #[error("{label}: entry {entry}: extent at offset {offset} with length {length} ends beyond 2^64")]
    ExtentOverflow {
        /// The caller's name for the input.
        label: String,
        /// Index of the extent.
        entry: usize,
        /// Offset of the extent.
        offset: u64,
        /// Length of the extent.
        length: u64,
    },
    /// An extent ends beyond the end of the disk.
    #[error(
        "{label}: entry {entry}: extent at offset {offset} with length {length} ends beyond the disk \
         ({disk_size} bytes): map made for another disk?"
    )]
    ExtentBeyondDisk {
        /// The caller's name for the input.
        label: String,
        /// Index of the extent.
        entry: usize,
        /// Offset of the extent.
        offset: u64,
        /// Length of the extent.
        length: u64,
        /// Size of the disk.
        disk_size: u64,
    },
    /// A VMware changedArea extent lies outside the range its query covered.
    #[error(
        "{label}: entry {entry}: changed area at offset {offset} with length {length} lies outside the queried \
         range {start}..{end}"
    )]
    ExtentOutsideQuery {
        /// The caller's name for the input.
        label: String,
        /// Index of the extent in its changedArea.
        entry: usize,
        /// Offset of the extent.
        offset: u64,
        /// Length of the extent.
        length: u64,
        /// startOffset of the query.
        start: u64,
        /// startOffset + length of the query.
        end: u64,
    },
    /// Two extents of one list overlap (adjacent extents are fine).
    #[error(
        "{label}: entry {entry} (offset {offset}, length {length}) overlaps entry {other} (offset {other_offset}, \
         length {other_length})"
    )]
    OverlappingExtents {
        /// The caller's name for the input.
        label: String,
        /// Index of the later extent.
        entry: usize,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u64,
        /// Index of the extent it overlaps.
        other: usize,
        /// That extent's offset.
        other_offset: u64,
        /// That extent's length.
        other_length: u64,
    },
    /// An nbdinfo map has a gap: it must describe every byte of the export, in order.
    #[error("{label}: entry {entry}: map has a gap: extent starts at {offset}, expected {expected}")]
    NotContiguous {
        /// The caller's name for the input.
        label: String,
        /// Index of the extent.
        entry: usize,
        /// Offset found.
        offset: u64,
        /// Offset expected (the end of the previous extent).
        expected: u64,
    },
    /// The map describes a disk of another size.
    #[error(
        "{label}: entry {entry}: map made for a disk of another size (it covers {map_size} bytes, this disk has \
         {disk_size})"
    )]
    DiskSizeMismatch {
        /// The caller's name for the input.
        label: String,
        /// Index of the element that gives the size (0 for a single object).
        entry: usize,
        /// The size the map declares or covers.
        map_size: u64,
        /// The size of the disk.
        disk_size: u64,
    },
    /// A chunk size that is not a power of two between [`MIN_CHUNK_SIZE`](crate::MIN_CHUNK_SIZE) and
    /// [`MAX_CHUNK_SIZE`](crate::MAX_CHUNK_SIZE).
    #[error("{label}: chunk size {chunk_size} is not a power of two between 64 KiB and 4 MiB")]
    InvalidChunkSize {
        /// The caller's name for the input.
        label: String,
        /// The chunk size given.
        chunk_size: u32,
    },
    /// A digest map given explicitly has the wrong number of digests for its geometry.
    #[error(
        "{label}: digest map holds {count} digests, but a disk of {disk_size} bytes in chunks of {chunk_size} \
         has {expected}"
    )]
    DigestCountMismatch {
        /// The caller's name for the input.
        label: String,
        /// Digests present.
        count: u64,
        /// Disk size.
        disk_size: u64,
        /// Chunk size.
        chunk_size: u32,
        /// Digests expected.
        expected: u64,
    },
    /// An encoded digest map shorter than its fixed header and trailer.
    #[error("{label}: digest map is {len} bytes, shorter than the minimum {min}: truncated, rebuild it")]
    DigestMapTooShort {
        /// The caller's name for the input.
        label: String,
        /// Bytes given.
        len: usize,
        /// Minimum length of an encoded map.
        min: usize,
    },
    /// An encoded digest map does not start with the magic.
    #[error("{label}: not a ferry digest map (magic {found:02x?})")]
    DigestMapBadMagic {
        /// The caller's name for the input.
        label: String,
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// An encoded digest map of a version this planner does not read.
    #[error("{label}: digest map version {version} is not supported (this build reads version {supported})")]
    DigestMapUnsupportedVersion {
        /// The caller's name for the input.
        label: String,
        /// Version found.
        version: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// The encoded length does not match the digest count: truncated or with trailing bytes.
    #[error(
        "{label}: digest map is {len} bytes but its header announces {count} digests ({expected} bytes): rebuild it"
    )]
    DigestMapLengthMismatch {
        /// The caller's name for the input.
        label: String,
        /// Bytes given.
        len: usize,
        /// Digest count from the header.
        count: u64,
        /// Length that count implies.
        expected: u128,
    },
    /// The trailing checksum does not match: the map is corrupt.
    #[error("{label}: digest map checksum mismatch (stored {stored:02x?}, computed {computed:02x?}): rebuild it")]
    DigestMapChecksumMismatch {
        /// The caller's name for the input.
        label: String,
        /// First bytes of the stored checksum.
        stored: [u8; 4],
        /// First bytes of the computed checksum.
        computed: [u8; 4],
    },
    /// The reserved header field of an encoded digest map is not zero.
    #[error("{label}: digest map header has reserved field {value:#06x}, expected 0")]
    DigestMapReserved {
        /// The caller's name for the input.
        label: String,
        /// The value found.
        value: u16,
    },
}
