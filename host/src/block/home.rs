//! Journal homes (stub).
