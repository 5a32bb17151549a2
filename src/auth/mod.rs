pub mod sign;
pub mod sources;
