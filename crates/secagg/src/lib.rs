//! SecAgg+ (protocol-spec).
