//! Wire types shared by `reimage-agent` and `reimagectl`.
