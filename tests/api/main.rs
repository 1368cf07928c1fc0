//! Black-box tests: the real server on a random port, a wiremock Graph API,
//! assertions on what the mock received. One binary, one link step.

mod abuse;
mod agent_api;
mod cli;
mod cloud_api;
mod cluster;
mod console;
mod durability;
mod events;
mod helpers;
mod messages_api;
mod openapi;
mod ops;
mod pipeline;
mod rules;
mod security;
mod sender;
mod stream;
mod webhook;
