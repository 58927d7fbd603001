//! The generated gRPC types of `proto/mlx_dist/v3/worker.proto`.
#![allow(clippy::all, missing_docs)]
tonic::include_proto!("mlx_dist.v3");
