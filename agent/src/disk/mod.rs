//! The target disk: opening it, keeping saved partitions, writing and reading back.
