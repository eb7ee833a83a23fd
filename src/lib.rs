pub mod backend;
pub mod environment;
pub mod reference;
pub mod resolve;
pub mod secret;
pub mod template;
