//! GGUF metadata values and typed conversion out of them.

use super::{GgufError, GgufResult};

/// The value type ids of the GGUF format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    /// Unsigned 8-bit integer.
    U8 = 0,
    /// Signed 8-bit integer.
    I8 = 1,
    /// Unsigned 16-bit integer.
    U16 = 2,
    /// Signed 16-bit integer.
    I16 = 3,
    /// Unsigned 32-bit integer.
    U32 = 4,
    /// Signed 32-bit integer.
    I32 = 5,
    /// 32-bit float.
    F32 = 6,
    /// Boolean, one byte that must be 0 or 1.
    Bool = 7,
    /// UTF-8 string with a u64 byte length.
    String = 8,
    /// Array: element type id, u64 count, then the items.
    Array = 9,
    /// Unsigned 64-bit integer.
    U64 = 10,
    /// Signed 64-bit integer.
    I64 = 11,
    /// 64-bit float.
    F64 = 12,
}

impl ValueType {
    /// The type for a GGUF type id; `None` for ids the format does not define.
    pub fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        [U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64].into_iter().find(|t| *t as u32 == id)
    }

    /// Bytes of a fixed-size value; strings and arrays take at least their 8-byte length.
    pub fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An unsigned 8-bit integer; the integer getters take it whenever it fits (see [`Value::as_i128`]).
    U8(u8),
    /// A signed 8-bit integer; the integer getters take it whenever it fits (see [`Value::as_i128`]).
    I8(i8),
    /// An unsigned 16-bit integer; the integer getters take it whenever it fits (see [`Value::as_i128`]).
    U16(u16),
    /// A signed 16-bit integer; the integer getters take it whenever it fits (see [`Value::as_i128`]).
    I16(i16),
    /// An unsigned 32-bit integer; the integer getters take it whenever it fits (see [`Value::as_i128`]).
    U32(u32),
    /// A signed 32-bit integer; the integer getters take it whenever it fits (see [`Value::as_i128`]).
    I32(i32),
    /// A 32-bit float; the float getters take either width (see [`Value::as_f64`]).
    F32(f32),
    /// A boolean (one byte, 0 or 1, in the file).
    Bool(bool),
    /// A UTF-8 string (GGUF stores no terminating NUL).
    String(String),
    /// Items all of `element` type (checked when read and when written).
    Array {
        /// Type id shared by every item.
        element: ValueType,
        /// The items, in file order.
        items: Vec<Value>,
    },
    /// An unsigned 64-bit integer; the integer getters take it whenever it fits (see [`Value::as_i128`]).
    U64(u64),
    /// A signed 64-bit integer; the integer getters take it whenever it fits (see [`Value::as_i128`]).
    I64(i64),
    /// A 64-bit float; the float getters take either width (see [`Value::as_f64`]).
    F64(f64),
}

impl Value {
    /// The GGUF type id this value is written with.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array { .. } => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// A short description for error messages ("u32", "array of string").
    pub fn type_name(&self) -> String {
        match self {
            Value::Array { element, .. } => format!("array of {element:?}").to_lowercase(),
            other => format!("{:?}", other.value_type()).to_lowercase(),
        }
    }

    /// The value as an integer, whatever its integer width.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as a float, from F32 or F64; `None` for every other type (integers are not converted).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A string array built from `&str`s.
    pub fn strings<S: AsRef<str>>(items: &[S]) -> Value {
        Value::Array { element: ValueType::String, items: items.iter().map(|s| Value::String(s.as_ref().into())).collect() }
    }
}

/// Conversion out of a metadata value, for the typed getters of `GgufFile`.
pub trait FromValue: Sized {
    /// What the type accepts, for the `expected` of [`GgufError::WrongType`] ("a float").
    const EXPECTED: &'static str;
    /// The converted value; `None` when the value has another type or does not fit.
    fn from_value(value: &Value) -> Option<Self>;

    /// Converts the value of `key`, or errors naming the key, the expected and the found type.
    fn convert(key: &str, value: &Value) -> GgufResult<Self> {
        Self::from_value(value).ok_or_else(|| GgufError::WrongType {
            key: key.to_owned(),
            expected: Self::EXPECTED,
            found: value.type_name(),
        })
    }
}

macro_rules! integer_from_value {
    ($($t:ty => $name:literal),*) => {$(
        impl FromValue for $t {
            const EXPECTED: &'static str = $name;
            fn from_value(value: &Value) -> Option<Self> {
                value.as_i128().and_then(|v| <$t>::try_from(v).ok())
            }
        }
    )*};
}
integer_from_value!(u32 => "an integer fitting u32", u64 => "a non-negative integer", usize => "a non-negative integer", i32 => "an integer fitting i32", i64 => "an integer");

impl FromValue for f32 {
    const EXPECTED: &'static str = "a float";
    fn from_value(value: &Value) -> Option<Self> {
        value.as_f64().map(|v| v as f32)
    }
}

impl FromValue for bool {
    const EXPECTED: &'static str = "a bool";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

impl FromValue for String {
    const EXPECTED: &'static str = "a string";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::String(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Vec<T> {
    const EXPECTED: &'static str = "an array";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Array { items, .. } => items.iter().map(T::from_value).collect(),
            _ => None,
        }
    }
}
