//! Conveyor's API: the actix-web server and the admin CLI's commands.
//!
//! # Layout
//!
//! - [`cli`]: the command line.
//! - [`startup`]: building, binding and running the server.
//! - [`routes`]: the HTTP routes and the request-id middleware.
//! - [`body`]: JSON request bodies with precise errors.
//! - [`error`]: [`error::ApiError`] and problem+json.

pub mod body;
pub mod cli;
pub mod error;
pub mod routes;
pub mod startup;
