-- The phones' work cycle: claim a release task, then report it published.
--   wrk ... -s cycle.lua URL -- PHONES THREADS
-- Each thread polls get_release_task for its own slice of the phones; every
-- task id an answer hands out is reported next with upload_url (any connection
-- of the thread may send it). run.py counts completions in the database.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

function init(args)
   local phones, threads = tonumber(args[1]), tonumber(args[2])
   slice = math.floor(phones / threads)
   first = tid * slice
   next_phone = 0
   claimed = {}  -- task ids to report, oldest first
end

local function report(id)
   local url = string.format("https%%3A%%2F%%2Fwww.xiaohongshu.com%%2Fexplore%%2F%024d", id)
   return wrk.format("POST", "/xiaohongshu_biji/upload_url", form,
                     "task_id=" .. id .. "&url=" .. url)
end

function request()
   local id = table.remove(claimed, 1)
   if id then
      return report(tonumber(id))
   end
   next_phone = next_phone % slice + 1
   return wrk.format("GET", "/xiaohongshu_biji/get_release_task?" .. phone_query(first + next_phone))
end

function response(status, headers, body)
   count(status, headers, body)
   local id = string.match(body, '"data":{"id":(%d+)')
   if id then
      table.insert(claimed, id)
   end
end
