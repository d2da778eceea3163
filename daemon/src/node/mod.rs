//! The node agent (`causeway node`).
