//! Conveyor's API: the actix-web server and the admin CLI's commands.
//!
//! # Layout
//!
//! - [`cli`]: the command line; [`commands`]: the admin commands behind it.
//! - [`startup`]: building, binding and running the server.
//! - [`routes`]: the HTTP routes and the request-id middleware.
//! - [`auth`]: API keys, JWTs, scopes: who is calling.
//! - [`body`]: JSON request bodies with precise errors.
//! - [`cache`]: ended jobs served from memory, kept coherent by Postgres NOTIFY.
//! - [`error`]: [`error::ApiError`] and problem+json.

pub mod auth;
pub mod body;
pub mod cache;
pub mod cli;
pub mod commands;
pub mod error;
pub mod routes;
pub mod startup;
