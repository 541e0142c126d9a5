//! `--source dir:PATH`: multi-document YAML files of Service, EndpointSlice, Node.
