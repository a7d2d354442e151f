-- Requests from a fleet of registered phones: each request comes from the next phone.
--   wrk ... -s phones.lua URL -- METHOD PATH PHONES [PARAMS]
-- METHOD is GET (parameters in the query string) or POST (urlencoded body, as
-- the phones' OkHttp sends forms); PARAMS are more urlencoded parameters.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

function init(args)
   method, path, phones = args[1], args[2], tonumber(args[3])
   params = (args[4] and args[4] ~= "") and ("&" .. args[4]) or ""
   next_phone = tid * 97  -- the threads start at different phones
end

function request()
   next_phone = next_phone % phones + 1
   local query = phone_query(next_phone) .. params
   if method == "POST" then
      return wrk.format("POST", path, form, query)
   end
   return wrk.format("GET", path .. "?" .. query)
end

response = count
