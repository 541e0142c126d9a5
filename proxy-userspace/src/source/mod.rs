//! Where Services, EndpointSlices and Nodes come from.
pub mod dir;
pub mod kube;
