//! azgate host library: the pieces the `azgate` binary is built from, also used by the
//! integration tests.
