//! How the job model's own types are stored: a status as its name (`text`),
//! a failure as JSON (`jsonb`), raw JSON as the text of a `jsonb` (statements
//! select `payload::text`, so nothing is ever decoded into a tree). Written by hand rather than derived so that
//! the model stays free of storage attributes.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::types::Json;
use sqlx::{Decode, Encode, Postgres, Type};

use crate::job::{JobFailure, JobStatus, RawJson};

impl Type<Postgres> for JobStatus {
    fn type_info() -> PgTypeInfo {
        <&str as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <&str as Type<Postgres>>::compatible(ty)
    }
}

impl Encode<'_, Postgres> for JobStatus {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <&str as Encode<Postgres>>::encode(self.as_str(), buf)
    }
}

impl<'r> Decode<'r, Postgres> for JobStatus {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(<&str as Decode<Postgres>>::decode(value)?.parse()?)
    }
}

impl Type<Postgres> for JobFailure {
    fn type_info() -> PgTypeInfo {
        <Json<Self> as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <Json<Self> as Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for JobFailure {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(<Json<Self> as Decode<Postgres>>::decode(value)?.0)
    }
}

impl Type<Postgres> for RawJson {
    fn type_info() -> PgTypeInfo {
        <&str as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <&str as Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for RawJson {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(RawJson::from_text(<String as Decode<Postgres>>::decode(value)?)?)
    }
}
