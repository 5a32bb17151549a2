//! The metadata a file must have besides its bytes: a plain value that the manifest's keys
//! become, the planner compares with what it observed, and the writer applies. It lives on its
//! own so that the pure planner imports only values, and the writer nothing of the planner.

/// What the file must look like besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    /// Permission bits (at most 0o777; the manifest allows far less).
    pub mode: u32,
    /// chown to this uid; `None` keeps the writer's own.
    pub uid: Option<u32>,
    /// chown to this gid; `None` keeps the writer's own.
    pub gid: Option<u32>,
}

impl FileMeta {
    /// A private file owned by the writer: the state file, the metrics file.
    pub const PRIVATE: FileMeta = FileMeta {
        mode: 0o600,
        uid: None,
        gid: None,
    };
}
